"""The `loraplex` command: `loraplex serve`, `loraplex serve-cluster` and `loraplex train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from server import __version__

    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LoRA inference server.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the base model and every adapter in the store",
                                description="Serve the base model and every adapter in the store over an "
                                "OpenAI-compatible HTTP API. Each flag can also be set as the environment "
                                "variable shown beside it; a flag given here wins.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(serve)
    cluster = commands.add_parser("serve-cluster", help="serve N engine replicas on this machine (Ray Serve)",
                                  description="Start a local Ray instance and serve N engine replicas over one "
                                  "shared adapter store behind one OpenAI-compatible ingress; requests for an "
                                  "adapter go to the replicas that hold it. Needs `pip install 'loraplex[cluster]'`. "
                                  "Takes every flag of `serve`.")
    cluster.add_argument("--replicas", type=int, default=2, help="engine replicas (default: 2)")
    cluster.add_argument("--replica-cpus", type=float, default=1.0,
                         help="CPUs reserved per replica; Ray sets its torch threads to it (default: 1)")
    cluster.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default: 0)")
    add_settings_flags(cluster)
    try:
        from server.train.options import add_train_arguments
    except ImportError:
        return parser
    add_train_arguments(commands.add_parser("train", help="fine-tune a LoRA adapter from a JSONL file"))
    return parser


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `Settings` field, with its description, default and environment variable.

    Values stay strings here: `Settings` validates and converts them, so flags, environment
    variables and their errors follow one set of rules.
    """
    from server.config import Settings

    for name, field in Settings.model_fields.items():
        if field.annotation is bool:  # --flag / --no-flag
            parser.add_argument(flag_of(name), dest=name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction,
                                help=f"{field.description or ''} (default: {'on' if field.default else 'off'}; "
                                     f"env LORAPLEX_{name.upper()})".replace("%", "%%"))
            continue
        # SUPPRESS: only flags given on the command line override the environment.
        parser.add_argument(flag_of(name), dest=name, default=argparse.SUPPRESS, metavar=metavar_of(field),
                            help=f"{field.description or ''} (default: {default_text(field)}; "
                                 f"env LORAPLEX_{name.upper()})".replace("%", "%%"))


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def metavar_of(field) -> str:
    choices = getattr(field.annotation, "__args__", None)
    if choices and all(isinstance(c, str) for c in choices):
        return "{" + ",".join(choices) + "}"
    if field.annotation in (int, float, int | None, float | None):
        return "N"
    return "PATH" if field.annotation in (Path, Path | None) else "TEXT"


def default_text(field) -> str:
    return "unset" if field.default is None else str(field.default)


def settings_error(exc) -> str:
    """One line per invalid value: the flag, the value given, and what is allowed."""
    from server.config import SECRET_FIELDS

    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        shown = "***" if name in SECRET_FIELDS else repr(error.get("input"))
        lines.append(f"loraplex: {flag_of(name)} (LORAPLEX_{name.upper()}) = {shown}: {error['msg']}")
    return "\n".join(lines)


def serve(overrides: dict) -> int:
    """Listen first, load the model behind the socket, drain on SIGTERM (server/api/serving.py)."""
    from pydantic import ValidationError

    from server.api.listen import bind
    from server.config import Settings
    from server.logs import configure_logging

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(settings_error(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"loraplex: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    from server.api.app import create_app  # FastAPI and uvicorn: imported once the port is ours
    from server.api.serving import run
    from server.bootstrap import build_engine

    return run(create_app(None, settings), settings, lambda: build_engine(settings), sock)


def serve_cluster(args: dict) -> int:
    """`loraplex serve-cluster`: a local Ray instance running `server/deploy/ray_serve.py`."""
    from pydantic import ValidationError

    from server.config import Settings

    replicas, cpus, gpus = args.pop("replicas"), args.pop("replica_cpus"), args.pop("replica_gpus")
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        print(settings_error(exc), file=sys.stderr)
        return 2
    try:
        from server.deploy.cluster import run_cluster
    except ImportError as exc:
        print(f"loraplex: serve-cluster needs Ray Serve ({exc}): pip install 'loraplex[cluster]'", file=sys.stderr)
        return 2
    if replicas < 1:
        print("loraplex: --replicas must be at least 1", file=sys.stderr)
        return 2
    return run_cluster(settings, args, replicas, cpus, gpus)


def main(argv: list[str] | None = None) -> int:
    from server.logs import configure_logging

    configure_logging("text")  # `serve` applies --log-format once its settings are read
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return serve(args)
    if command == "serve-cluster":
        return serve_cluster(args)
    from server.train.command import run_train
    return run_train(argparse.Namespace(**args))


if __name__ == "__main__":
    sys.exit(main())
