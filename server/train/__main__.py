"""`python -m server.train ...`: the same command as `loraplex train`."""

from __future__ import annotations

import argparse
import sys

from server.train.command import add_train_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.train", description="Fine-tune a LoRA adapter.")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
