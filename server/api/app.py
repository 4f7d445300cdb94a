"""The FastAPI app factory. The engine is built elsewhere and handed in; nothing here imports torch."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.access_log import AccessLog
from server.api.admin_routes import router as admin_router
from server.api.auth import AuthGate
from server.api.background import BackgroundPool
from server.api.body_limit import BodyLimit
from server.api.console_routes import install_console
from server.api.errors import error_response, install_error_handlers
from server.api.lifecycle import AdmissionGate, Lifecycle
from server.api.metrics import ApiMetrics
from server.api.openai_routes import router as openai_router
from server.api.tokenize_routes import router as tokenize_router
from server.api.uploads import UploadSlots
from server.config import Settings
from server.engine.protocol import EngineAPI

DESCRIPTION = """Multi-adapter LoRA inference server with an OpenAI-compatible API.

`model` is an adapter name or the base model's served name. Inference routes need
`Authorization: Bearer <LORAPLEX_API_KEY>` when a key is configured; adapter admin routes
need `Authorization: Bearer <LORAPLEX_ADMIN_TOKEN>` and are disabled without one."""


def engine_ready(engine: EngineAPI | None) -> bool:
    """True once the model is loaded and the engine loop runs."""
    return engine is not None and engine.ready


def create_app(engine: EngineAPI | None, settings: Settings | None = None) -> FastAPI:
    """`engine` follows `EngineAPI` (server/engine/protocol.py: async `submit`, `models`, adapter admin, `stats`,
    shutdown).

    It may be None while the model loads: set `app.state.engine` once it is ready; until
    then `/ready` and every `/v1` route answer 503 `engine_not_ready`.
    """
    settings = settings or getattr(engine, "settings", None) or Settings()
    # docs_url/redoc_url None: FastAPI's own pages load their assets from a CDN; install_console serves /docs.
    app = FastAPI(title="loraplex", version=__version__, description=DESCRIPTION, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings = engine, settings
    app.state.lifecycle = Lifecycle()
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads)
    app.state.background = BackgroundPool(settings.max_concurrent_uploads + 2, settings.background_niceness)
    app.state.metrics = metrics = ApiMetrics(lambda: app.state.engine)
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(tokenize_router)
    install_console(app)
    # Added innermost first. Outermost: the access log (it logs every refusal too), then auth and
    # admission, which answer from the headers alone, before anything reads a body.
    app.add_middleware(BodyLimit, read_timeout=settings.body_read_timeout)
    app.add_middleware(AdmissionGate, state=app.state)
    app.add_middleware(AuthGate, settings=settings)
    app.add_middleware(AccessLog, metrics=metrics)

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: model loaded and engine running (else 503)",
             responses={503: {"description": "engine not ready"}})
    async def ready(request: Request) -> JSONResponse:
        if request.app.state.lifecycle.shutting_down:
            return error_response(503, "the server is shutting down", code="shutting_down",
                                  headers={"Retry-After": "1"})
        if not engine_ready(request.app.state.engine):
            return error_response(503, "the engine is not running yet", code="engine_not_ready",
                                  headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
