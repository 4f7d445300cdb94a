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
    import uvicorn
    from pydantic import ValidationError

    from server.api.app import create_app
    from server.config import Settings
    from server.engine.engine import Engine
    from server.models import ModelLoadError, load_base_model

    try:
        settings = Settings(**overrides)
        base = load_base_model(settings)
    except (ValidationError, ModelLoadError) as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2
    engine = Engine(base, settings)
    engine.load_store()
    engine.start()
    try:
        # access_log off: the API logs one line per request itself (server.api.access), without keys or prompts.
        uvicorn.run(create_app(engine, settings), host=settings.host, port=settings.port, log_level="info",
                    access_log=False)
    finally:
        engine.stop()
    return 0


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
