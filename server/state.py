"""What one app holds: settings, metrics, admission, and the engine once it has loaded.

The model loads in a worker thread after uvicorn is already listening, so /health can
answer 503 while loading instead of refusing connections."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from headwise.engine.async_engine import AsyncEngine
from headwise.engine.llm_engine import LLMEngine
from headwise.server.admission import Admission
from headwise.server.errors import APIError
from headwise.server.metrics import ServerMetrics
from headwise.server.settings import ServerSettings

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: ServerSettings, load_engine: Callable[[], LLMEngine]) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.admission = Admission(settings.max_queue, self._count_rejection)
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None
        self.model_name = settings.served_model_name or ""
        self.created = int(time.time())
        self._load_engine = load_engine

    def _count_rejection(self) -> None:
        self.metrics.rejected.labels(self.model_name).inc()

    @property
    def ready(self) -> bool:
        return self.async_engine is not None

    async def load(self) -> None:
        """Load the engine off the event loop and start its worker; a failure is kept for
        /health and re-raised for the caller (serve exits on it)."""
        started = time.monotonic()
        try:
            engine = await asyncio.to_thread(self._load_engine)
            async_engine = AsyncEngine(engine)
            async_engine.start()
        except Exception as e:
            self.load_error = e
            log.error("model failed to load: %s", e)
            raise
        self.engine = engine
        self.model_name = self.settings.served_model_name or engine.model_id
        self.metrics.bind(self.model_name, engine.stats)
        self.async_engine = async_engine
        log.info("model %s ready in %.1f s: max_model_len %d, plans %s (default %s)", self.model_name,
                 time.monotonic() - started, engine.max_model_len, ", ".join(engine.plans), engine.default_plan)

    async def shutdown(self) -> None:
        """Finish what is in flight (bounded by --drain-timeout), then stop the worker."""
        if self.async_engine is not None:
            await self.async_engine.shutdown(drain=True, timeout=self.settings.drain_timeout)
            self.async_engine = None

    def require_engine(self) -> tuple[LLMEngine, AsyncEngine]:
        """The loaded engine, or HTTP 503 while it is still loading (or failed to)."""
        if self.engine is None or self.async_engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", None, "model_load_failed")
            raise APIError(503, "the model is still loading; retry when GET /health returns 200",
                           None, "model_loading")
        return self.engine, self.async_engine

    def check_model(self, requested: str | None) -> None:
        """404 unless the request names the served model (or names none)."""
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                           f"`{self.model_name}`.", "model", "model_not_found")

    def check_plan(self, plan: str | None) -> None:
        """404 for a kv_plan that was not loaded with --plan; None means the default plan."""
        if plan is None or self.engine is None:
            return
        if plan not in self.engine.plans:
            raise APIError(404, f"kv_plan {plan!r} is not loaded; loaded plans: "
                           f"{', '.join(sorted(self.engine.plans))}", "kv_plan", "plan_not_found")
