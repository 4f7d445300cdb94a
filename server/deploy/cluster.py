"""`loraplex serve-cluster`: a local Ray instance running the Serve application on this machine.

For a real cluster (a head and workers on several machines) use `serve run deploy/ray-serve.yaml`
or `serve deploy` against the running cluster instead; this command is the one-machine form.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

from server.config import SECRET_FIELDS, Settings

log = logging.getLogger(__name__)
APP_NAME = "loraplex"
PATH_FIELDS = ("adapters_dir", "cache_dir", "model", "upload_tmp_dir", "allowed_adapter_root")


def replica_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The flags as every replica gets them: paths made absolute (replicas do not share this process's cwd),
    secrets left out (they travel in the environment, not in Ray's control store)."""
    out = {}
    for name, value in overrides.items():
        if name in SECRET_FIELDS or name in ("host", "port"):
            continue
        if name in PATH_FIELDS and value is not None and (name != "model" or Path(value).exists()):
            value = str(Path(value).expanduser().resolve())
        out[name] = value
    out.setdefault("adapters_dir", str(Path(Settings().adapters_dir).resolve()))
    return out


def export_secrets(settings: Settings) -> None:
    """Keys given as flags reach the replicas through the environment the Ray processes inherit."""
    for name in SECRET_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            os.environ[f"LORAPLEX_{name.upper()}"] = value.get_secret_value()


def run_cluster(settings: Settings, overrides: dict[str, Any], replicas: int, replica_cpus: float,
                replica_gpus: float) -> int:
    """Start Ray and the application, serve until SIGTERM or SIGINT, then shut both down; 0 when clean."""
    import ray
    from ray import serve

    from server.deploy.ray_serve import build_app

    export_secrets(settings)
    # Serve's router asks each replica its queue length and skips one that takes longer than this
    # (0.1 s by default; here 1 s): a replica whose cores are busy with a forward pass answers later than that,
    # and its adapters' requests would go elsewhere.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5.0")
    project = str(Path(__file__).resolve().parents[2])  # replicas import this checkout's `server`
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(replicas * replica_cpus)),
             num_gpus=math.ceil(replicas * replica_gpus) or None, include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=2 * settings.max_adapter_bytes + 2**27,
             logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        app = build_app({"replicas": replicas, "replica_cpus": replica_cpus, "replica_gpus": replica_gpus,
                         "settings": replica_overrides(overrides)})
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("serving %d replicas behind http://%s:%d", replicas, settings.host, settings.port)
        stop.wait()
        log.info("shutting down the cluster")
        serve.shutdown()
        return 0
    finally:
        ray.shutdown()
