"""The Ray Serve application: one ingress, N engine replicas, one metrics board, one shared store.

- `EngineReplica` (N replicas): each is one loraplex engine and the single server's app
  (`create_app`), over the shared store (`shared_store=True`). Its multiplexed "models" are
  adapter names, `max_num_models_per_replica` = `--max-cpu-loras` (the adapters it keeps parsed
  in memory; `--max-loras` of them sit in device slots), so Serve routes an adapter's requests
  to the replicas that hold it and loads it on a less busy one otherwise. Every response
  carries `x-loraplex-replica`.
- `ClusterIngress`: the HTTP front (`ingress.py`): the body's `model` becomes the request's
  multiplexed model id; no `@serve.batch` anywhere: each engine batches every adapter in one
  forward pass.
- `MetricsBoard` (one replica): replicas report their `/metrics` text every few seconds; the
  ingress's `/metrics` merges them, labelled by replica.

Build it with `build_app({"replicas": 2, "settings": {...flags...}})`: `serve run
deploy/ray-serve.yaml` and `loraplex serve-cluster` both do. Secrets (`LORAPLEX_API_KEY`,
`LORAPLEX_ADMIN_TOKEN`) come from each process's environment, never from these arguments.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import generate_latest
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from server.config import SECRET_FIELDS, Settings
from server.deploy.forwarding import ForwardedRequest, ResponseStart, run_app
from server.deploy.ingress import IngressApp
from server.deploy.metrics_merge import merge_metrics
from server.threads import run_in_fresh_thread

REPLICA_HEADER = b"x-loraplex-replica"
REPORT_EVERY = 2.0   # seconds between a replica's metrics reports
STALE_AFTER = 15.0   # a replica that has not reported for this long (it died) leaves the merged metrics


def cluster_settings(overrides: dict[str, Any]) -> Settings:
    """The settings every process of the application uses: the overrides, the environment, a shared store."""
    public = {k: v for k, v in overrides.items() if k not in SECRET_FIELDS}
    return Settings(**{**public, "shared_store": True})


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class MetricsBoard:
    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self.reports[replica] = (time.monotonic(), text)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.reports = {r: (t, text) for r, (t, text) in self.reports.items() if now - t < STALE_AFTER}
        return {r: text for r, (_, text) in self.reports.items()}


def replica_class(max_models: int) -> type:
    """The replica deployment's class; `max_models` must be fixed when the class is made (Serve reads it then)."""

    class EngineReplica:
        async def __init__(self, overrides: dict[str, Any], board: DeploymentHandle) -> None:  # type: ignore[misc]
            # Serve awaits a replica's async constructor: the model loads without blocking the replica's loop.
            from server.api.app import create_app
            from server.bootstrap import build_engine

            settings = cluster_settings(overrides)
            # The model loads in a thread that ends: only the engine's own thread keeps torch's workers.
            self.engine = await asyncio.to_thread(run_in_fresh_thread, build_engine, settings)
            self.app = create_app(self.engine, settings)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.extra_headers = ((REPLICA_HEADER, self.replica.encode()),)
            self.board = board
            self.reporter = asyncio.get_running_loop().create_task(self.report_metrics())

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def hold_adapter(self, name: str) -> str:
            """Serve routes `name` here from now on: parse it into the CPU tier before its first request needs it."""
            await asyncio.to_thread(self.warm, name)
            return name

        def warm(self, name: str) -> None:
            self.engine.sync_store()
            record = self.engine.registry.get(name)
            if record is not None:
                self.engine.registry.request_load(record)

        async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
            adapter = serve.get_multiplexed_model_id()
            if adapter:
                await self.hold_adapter(adapter)
            async for item in run_app(self.app, request, self.extra_headers):
                yield item

        def base_name(self) -> str:
            return self.engine.base_name

        async def report_metrics(self) -> None:
            info = (f"# HELP loraplex_replica_info the replica's process\n# TYPE loraplex_replica_info gauge\n"
                    f'loraplex_replica_info{{pid="{os.getpid()}"}} 1.0\n')
            while True:
                text = generate_latest(self.app.state.metrics.registry).decode() + info
                try:
                    await self.board.report.remote(self.replica, text)
                except Exception:  # noqa: BLE001 - the board restarts; the next report gets through
                    pass
                await asyncio.sleep(REPORT_EVERY)

        def __del__(self) -> None:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()

    return EngineReplica


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress()
class ClusterIngress:
    def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, overrides: dict[str, Any]) -> None:
        self.settings = cluster_settings(overrides)
        self.replicas, self.board = replicas, board
        self._base: str | None = None

    def __serve_build_asgi_app__(self) -> IngressApp:
        return IngressApp(self.settings, self.forward, self.metrics, self.base_name)

    async def forward(self, request: ForwardedRequest, model_id: str | None) -> AsyncIterator[ResponseStart | bytes]:
        handle = self.replicas.options(stream=True, method_name="forward")
        if model_id:  # options copy the handle's and update them: still a stream
            handle = handle.options(multiplexed_model_id=model_id)
        stream: Any = handle.remote(request)  # with stream=True, a DeploymentResponseGenerator
        try:
            async for item in stream:
                yield item
        finally:
            stream.cancel()  # the client left or the stream ended: nothing more runs for it

    async def metrics(self) -> bytes:
        return merge_metrics(await self.board.collect.remote())

    async def base_name(self) -> str:
        if self._base is None:
            self._base = await self.replicas.options(method_name="base_name").remote()
        return self._base


def build_app(args: dict[str, Any]) -> Application:
    """The application: `args` = {"replicas": N, "replica_cpus": c, "replica_gpus": g, "settings": {flag: value}}."""
    overrides = dict(args.get("settings") or {})
    settings = cluster_settings(overrides)
    options = {"num_cpus": float(args.get("replica_cpus", 1)), "num_gpus": float(args.get("replica_gpus", 0))}
    replica = serve.deployment(replica_class(settings.max_cpu_loras), name="EngineReplica",
                               num_replicas=int(args.get("replicas", 1)), ray_actor_options=options,
                               max_ongoing_requests=settings.max_running + max(1, settings.max_queue // 2),
                               health_check_period_s=5, graceful_shutdown_timeout_s=settings.shutdown_grace)
    # `@serve.deployment` turns each class into a Deployment with `bind`; mypy keeps a decorated class's type.
    board = MetricsBoard.bind()  # type: ignore[attr-defined]
    return ClusterIngress.bind(replica.bind(overrides, board), board, overrides)  # type: ignore[attr-defined]
