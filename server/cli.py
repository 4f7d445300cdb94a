"""The `loraplex` command: `loraplex serve` and `loraplex train`."""

from __future__ import annotations

import argparse
import logging
import sys

SERVE_FLAGS = {
    "--host": str, "--port": int, "--model": str, "--served-model-name": str, "--cache-dir": str,
    "--adapters-dir": str, "--max-loras": int, "--max-lora-rank": int, "--device": str, "--dtype": str,
    "--max-cpu-loras": int, "--kv-cache-tokens": int, "--block-size": int, "--max-batched-tokens": int,
    "--max-running": int, "--max-queue": int,
    "--api-key": str, "--admin-token": str, "--max-adapter-bytes": int, "--allowed-adapter-root": str,
    "--max-tokens-default": int, "--chat-max-tokens-default": int,
    "--max-prompt-chars": int, "--max-concurrent-uploads": int, "--upload-read-timeout": float,
    "--body-read-timeout": float, "--upload-tmp-dir": str, "--keep-alive-timeout": int,
    "--limit-concurrency": int, "--max-header-bytes": int, "--shutdown-grace": float,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LoRA inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the base model and every adapter in the store",
                                description="Each flag can also be set as LORAPLEX_<FLAG> (e.g. LORAPLEX_MAX_LORAS).")
    for flag, kind in SERVE_FLAGS.items():
        # SUPPRESS: only flags given on the command line override the environment.
        serve.add_argument(flag, type=kind, default=argparse.SUPPRESS)
    try:
        from server.train.command import add_train_arguments
    except ImportError:
        return parser
    add_train_arguments(commands.add_parser("train", help="fine-tune a LoRA adapter from a JSONL file"))
    return parser


def serve(overrides: dict) -> int:
    """Listen first, load the model behind the socket, drain on SIGTERM (server/api/serving.py)."""
    from pydantic import ValidationError

    from server.api.app import create_app
    from server.api.serving import bind, run
    from server.config import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"loraplex: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return run(create_app(None, settings), settings, lambda: build_engine(settings), sock)


def build_engine(settings):
    """The model and the engine, started (runs in the loading thread while the server already listens)."""
    from server.engine.engine import Engine
    from server.models import load_base_model

    engine = Engine(load_base_model(settings), settings)
    engine.load_store()
    engine.start()
    return engine


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return serve(args)
    from server.train.command import run_train
    return run_train(argparse.Namespace(**args))


if __name__ == "__main__":
    sys.exit(main())
