"""The FastAPI app: lifespan (background model load, drain on shutdown), middleware, error
handlers, and the small routes; generation routes live in completions.py and chat.py."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from headwise.engine.llm_engine import LLMEngine
from headwise.server import chat, completions, tokenize
from headwise.server.auth import require_api_key
from headwise.server.errors import install_error_handlers
from headwise.server.request_id import RequestIdMiddleware
from headwise.server.settings import ServerSettings
from headwise.server.state import ServerState

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings, load_engine: Callable[[], LLMEngine],
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An app whose engine comes from `load_engine()`, run in a thread once the server is up.

    `on_load_failure` lets `headwise serve` exit when the model cannot load; without it the
    app keeps answering 503 with the reason."""
    state = ServerState(settings, load_engine)

    async def load() -> None:
        try:
            await state.load()
        except Exception as e:
            if on_load_failure is not None:
                on_load_failure(e)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        yield
        if not loading.done():
            loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await state.shutdown()

    app = FastAPI(title="headwise", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.headwise = state
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "message": str(state.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    def model_card() -> dict:
        engine, _ = state.require_engine()
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "headwise",
                "root": engine.model_id, "max_model_len": engine.max_model_len,
                "kv_plans": sorted(engine.plans), "default_kv_plan": engine.default_plan}

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(require_api_key)])
    async def model(model: str) -> dict:
        state.check_model(model)
        return model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
