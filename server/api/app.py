"""The FastAPI app factory. The engine is built elsewhere and handed in."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server import __version__
from server.api.errors import install_error_handlers
from server.api.openai_routes import router as openai_router


def create_app(engine: Any) -> FastAPI:
    """`engine` offers `generate(GenerationRequest)` (async) and `models()`."""
    app = FastAPI(title="loraplex", version=__version__,
                  description="Multi-adapter LoRA inference server with an OpenAI-compatible API.")
    app.state.engine = engine
    install_error_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
