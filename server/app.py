"""The FastAPI app: lifespan (background model load, drain on shutdown), middleware, error
handlers, and the small routes; generation routes live in completions.py and chat.py."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from headwise.engine.llm_engine import LLMEngine
from headwise.server import chat, completions, protocol, responses, responses_api, responses_api_protocol, tokenize
from headwise.server.auth import APIKeyMiddleware
from headwise.server.body_limit import BodyLimitMiddleware
from headwise.server.errors import install_error_handlers
from headwise.server.openapi import errors, install_openapi
from headwise.server.request_id import RequestIdMiddleware
from headwise.server.responses import HealthResponse, ModelCard, ModelList
from headwise.server.settings import ServerSettings
from headwise.server.state import ServerState

log = logging.getLogger(__name__)

VERSION = importlib.metadata.version("headwise")


def create_app(
    settings: ServerSettings,
    load_engine: Callable[[], LLMEngine],
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app whose engine comes from `load_engine()`, run in a thread once the server is up.

    `on_fatal(error)` lets `headwise serve` exit when the model cannot load or the engine
    dies; without it the app keeps answering 503 with the reason."""
    state = ServerState(settings, load_engine, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load())
        yield
        if not loading.done():
            loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        await state.shutdown()

    app = FastAPI(
        title="headwise",
        version=VERSION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="OpenAI-compatible completions and chat over a head-aware paged KV cache.",
    )
    app.state.headwise = state
    # the last added runs first: the request id is on every response (413 and 401 too), and
    # the key is checked before the size limit reads the body
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, timeout=settings.body_timeout)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestIdMiddleware)
    if settings.allowed_origins:
        # outermost: a browser's preflight carries no API key and must be answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=list(settings.allowed_methods),
            allow_headers=list(settings.allowed_headers),
            allow_credentials=False,
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(responses_api.router)
    app.include_router(tokenize.router)

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={
            503: {
                "model": HealthResponse,
                "description": "loading, error (the model did not "
                "load), draining (SIGTERM) or dead (engine fault; the process exits)",
            }
        },
    )
    async def health() -> Response:
        status, body = state.health()
        return JSONResponse(body, status_code=status, headers=state.health_headers(status))

    def model_card(name: str) -> dict:
        engine, _ = state.require_engine()
        return {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "headwise",
            "root": engine.model_id,
            "max_model_len": engine.max_model_len,
            "kv_plans": sorted(engine.plans),
            "default_kv_plan": engine.default_plan,
        }

    @app.get("/v1/models", response_model=ModelList, responses=errors(401, 503))
    async def models() -> Response:
        state.require_engine()
        return JSONResponse({"object": "list", "data": [model_card(name) for name in state.model_names]})

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=errors(401, 404, 503))
    async def model(model: str) -> Response:
        state.require_engine()  # 503 while loading: the served names are not known yet
        state.check_model(model)
        return JSONResponse(model_card(model))

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            }
        },
    )
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_openapi(
        app,
        state.schema_bounds,
        requests=[
            protocol.CompletionRequest,
            protocol.ChatCompletionRequest,
            protocol.TokenizeRequest,
            protocol.DetokenizeRequest,
            responses_api_protocol.ResponsesRequest,
            responses_api_protocol.MessageItem,
        ],
        responses=[
            responses.ErrorResponse,
            responses.CompletionResponse,
            responses.CompletionChunk,
            responses.ChatCompletionResponse,
            responses.ChatCompletionChunk,
            responses.ModelList,
            responses.ModelCard,
            responses.TokenizeResponse,
            responses.DetokenizeResponse,
            responses.HealthResponse,
            responses_api_protocol.ResponseObject,
            responses_api_protocol.ResponseStreamEvent,
        ],
    )
    return app
