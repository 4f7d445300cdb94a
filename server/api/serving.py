"""Run the app under uvicorn: listen first, load the model behind it, drain on SIGTERM.

Start-up: the socket is bound before anything else, so a port in use is reported at once;
the model then loads in a background thread while `/health` answers 200 and `/ready` 503.
Shutdown (SIGTERM or SIGINT): the server keeps listening but stops admitting (`/ready` and
new inference requests and uploads: 503), waits up to `--shutdown-grace` seconds for the
requests and uploads in flight to finish, then closes the connections and exits 0. A
second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api.http_protocol import bounded_protocol
from server.api.listen import bind  # noqa: F401 - re-exported: the serving path's first step
from server.config import Settings
from server.engine.protocol import EngineAPI
from server.logs import logging_config

log = logging.getLogger(__name__)
DRAIN_POLL = 0.05
FINAL_FLUSH = 1       # seconds uvicorn gets, after the drain, to send what the finished requests left


def uvicorn_config(app: FastAPI, settings: Settings, grace: float) -> uvicorn.Config:
    # access_log off: the API logs one line per request itself (server.api.access), without keys or prompts.
    # httptools (C) with a head-size bound of our own: see http_protocol.py.
    # log_config: uvicorn's loggers share the server's one format (server/logs.py) instead of their own.
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                          log_config=logging_config(settings.log_format),
                          http=bounded_protocol(settings.max_header_bytes),
                          timeout_keep_alive=settings.keep_alive_timeout,
                          limit_concurrency=settings.limit_concurrency,
                          timeout_graceful_shutdown=max(1, int(grace) + 1))


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain phase between the signal and uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.app, self.grace = app, grace
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in `_captured_signals`: uvicorn would re-raise it after serving, and the
        # process would die of SIGTERM instead of exiting 0.
        if self.draining or self.loop is None:
            log.warning("second signal %s: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    def busy(self) -> int:
        engine = self.app.state.engine
        active = engine.num_active() if engine is not None else 0
        return self.app.state.lifecycle.in_flight + active

    async def drain(self) -> None:
        lifecycle = self.app.state.lifecycle
        lifecycle.shutting_down = True
        engine = self.app.state.engine
        if engine is not None:
            engine.begin_shutdown()
        log.info("shutting down: no new requests; waiting up to %g s for %d in flight", self.grace, self.busy())
        deadline = time.monotonic() + self.grace
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        left = self.busy()
        if left:
            log.warning("shutdown grace of %g s is over: %d requests still in flight are cut off", self.grace, left)
            self.config.timeout_graceful_shutdown = 0  # uvicorn cancels what is left at once
        else:
            self.config.timeout_graceful_shutdown = FINAL_FLUSH
        self.should_exit = True


def start_loading(app: FastAPI, server: GracefulServer, build: Callable[[], EngineAPI]) -> threading.Thread:
    """Build the engine in a daemon thread; the app serves it once built (or the server exits on failure)."""
    def load() -> None:
        try:
            engine = build()
        except Exception as exc:  # noqa: BLE001 - reported, and the process exits non-zero
            log.error("the model could not be loaded: %s", exc)
            app.state.lifecycle.load_error = str(exc)
            server.should_exit = True
            return
        if app.state.lifecycle.shutting_down:
            engine.stop()
            return
        app.state.engine = engine
        log.info("engine ready")

    thread = threading.Thread(target=load, name="loraplex-load", daemon=True)
    thread.start()
    return thread


def run(app: FastAPI, settings: Settings, build: Callable[[], EngineAPI], sock: socket.socket) -> int:
    """Serve until a signal and the drain are over; 0 on a clean shutdown, 2 if the model failed to load."""
    grace = settings.shutdown_grace
    server = GracefulServer(uvicorn_config(app, settings, grace), app, grace)
    loader = start_loading(app, server, build)
    try:
        server.run(sockets=[sock])
    finally:
        loader.join(timeout=0 if app.state.lifecycle.load_error else 1)
        engine = app.state.engine
        if engine is not None:
            engine.stop()
    return 2 if app.state.lifecycle.load_error else 0
