"""What one app holds: settings, metrics, admission, the engine once it has loaded, and
the lifecycle /health reports: loading -> ok -> draining (SIGTERM), or error (the model
did not load), or dead (the engine loop stopped on a fault it could not pin on a request).

The model loads in a worker thread after uvicorn is already listening, so /health can
answer 503 while loading instead of refusing connections."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from headwise.engine.async_engine import AsyncEngine
from headwise.engine.llm_engine import LLMEngine
from headwise.server.admission import Admission
from headwise.server.errors import APIError, printable, retry_after
from headwise.server.generation_defaults import load_generation_defaults
from headwise.server.metrics import ServerMetrics
from headwise.server.offload import TokenizerThread
from headwise.server.protocol import CONTEXT_BOUND, PROMPTS_BOUND, VOCAB_BOUND
from headwise.server.settings import ServerSettings

log = logging.getLogger(__name__)

# after a drain's deadline aborts what is left, how long those streams get to send their
# last event and [DONE]
ABORT_GRACE_S = 5.0
_MAX_SHOWN = 100  # characters of a client-chosen name quoted back in an error


class ServerState:
    def __init__(
        self,
        settings: ServerSettings,
        load_engine: Callable[[], LLMEngine],
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`on_fatal(error)` runs on the event loop when the model fails to load or the
        engine dies; `headwise serve` exits on it."""
        self.settings = settings
        self.metrics = ServerMetrics()
        self.admission = Admission(settings.max_queue, self._count_rejection)
        self.tokenizer_thread = TokenizerThread()
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None
        self.engine_error: BaseException | None = None
        self.draining = False
        self.model_names: tuple[str, ...] = settings.served_model_name or ()
        self.model_name = self.model_names[0] if self.model_names else ""  # what responses carry
        self.generation_defaults: dict = {}  # generation_config.json's, under each request's own values
        self.created = int(time.time())
        self._load_engine = load_engine
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_closed = False

    def _count_rejection(self) -> None:
        self.metrics.rejected.labels(self.model_name).inc()

    @property
    def ready(self) -> bool:
        return self.async_engine is not None and self.engine_error is None

    def health_headers(self, status: int) -> dict[str, str]:
        return retry_after(status)

    def health(self) -> tuple[int, dict]:
        """/health's status code and body."""
        if self.engine_error is not None:
            return 503, {"status": "dead", "message": printable(f"engine fault: {self.engine_error}")}
        if self.draining:
            return 503, {"status": "draining"}
        if self.ready:
            return 200, {"status": "ok"}
        if self.load_error is not None:
            return 503, {"status": "error", "message": printable(str(self.load_error))}
        return 503, {"status": "loading"}

    async def load(self) -> None:
        """Load the engine off the event loop and start its worker; a failure is kept for
        /health and handed to `on_fatal`."""
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            engine = await asyncio.to_thread(self._load_engine)
            defaults = load_generation_defaults(self.settings.generation_config, engine.model_dir)
            async_engine = AsyncEngine(engine, on_death=self._engine_died)
            async_engine.start()
        except Exception as e:
            self.load_error = e
            log.error("model failed to load: %s", e)
            if self._on_fatal is not None:
                self._on_fatal(e)
            return
        self.engine = engine
        self.generation_defaults = defaults
        self.model_names = self.settings.served_model_name or (engine.model_id,)
        self.model_name = self.model_names[0]
        self.metrics.bind(self.model_name, engine.stats)
        self.async_engine = async_engine
        log.info(
            "model %s ready in %.1f s: max_model_len %d, plans %s (default %s)",
            self.model_name,
            time.monotonic() - started,
            engine.max_model_len,
            ", ".join(engine.plans),
            engine.default_plan,
        )

    def _engine_died(self, error: BaseException) -> None:
        """From the engine's worker thread, after it failed every open stream."""
        self.engine_error = error
        log.critical("the engine died (%s: %s): /health now answers 503", type(error).__name__, error)
        if self._on_fatal is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_fatal, error)

    async def drain(self, timeout: float) -> None:
        """SIGTERM: /health turns 503 and new generations are refused at once; in-flight
        requests get `timeout` seconds to finish, then the rest end with finish_reason
        "abort" (streams get that last event and [DONE]) and a short grace to send it."""
        self.draining = True
        loop = asyncio.get_running_loop()
        log.info("draining: %d requests in flight, up to %.1f s", self.admission.in_flight, timeout)
        deadline = loop.time() + timeout
        while self.admission.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self.admission.in_flight or self.async_engine is None:
            return
        log.warning('drain timeout: ending %d unfinished requests with finish_reason "abort"', self.admission.in_flight)
        deadline = loop.time() + ABORT_GRACE_S
        while self.admission.in_flight and loop.time() < deadline:
            # repeated: a request whose add was still queued at the first abort is caught by the next
            self.async_engine.abort_all()
            await asyncio.sleep(0.1)

    async def shutdown(self) -> None:
        """Finish what is in flight (bounded by --drain-timeout), stop the worker, then the
        engine's tensor-parallel workers and process groups (dead or alive)."""
        if self.async_engine is not None:
            await self.async_engine.shutdown(drain=True, timeout=self.settings.drain_timeout)
            self.async_engine = None
        if self.engine is not None and not self._engine_closed:
            self._engine_closed = True  # idempotent: the drain calls it before the lifespan does
            await asyncio.to_thread(self.engine.close)
        self.tokenizer_thread.close()

    def schema_bounds(self) -> dict[str, int] | None:
        """The numbers /openapi.json states for the markers in server/protocol.py; None
        until the model has loaded (the document is then served without them, uncached)."""
        if self.engine is None:
            return None
        vocab = min(self.engine.model_config.vocab_size, len(self.engine.tokenizer))
        return {
            VOCAB_BOUND: vocab - 1,
            CONTEXT_BOUND: self.engine.max_model_len,
            PROMPTS_BOUND: self.settings.max_prompts_per_request,
        }

    def require_engine(self) -> tuple[LLMEngine, AsyncEngine]:
        """The loaded engine, or HTTP 503 while it is still loading (or failed to, or died)."""
        if self.engine_error is not None:
            raise APIError(
                503,
                f"the engine stopped after an internal fault ({self.engine_error}); the server is going down",
                None,
                "engine_dead",
            )
        if self.engine is None or self.async_engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", None, "model_load_failed")
            raise APIError(503, "the model is still loading; retry when GET /health returns 200", None, "model_loading")
        return self.engine, self.async_engine

    def check_accepting(self) -> None:
        """503 for new generations once a drain has begun."""
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", None, "draining")

    def check_model(self, requested: str | None) -> None:
        """404 unless the request names a served model (or names none)."""
        if requested is not None and requested not in self.model_names:
            served = ", ".join(f"`{name}`" for name in self.model_names)
            raise APIError(
                404,
                f"The model {shown(requested)} does not exist; this server serves {served}.",
                "model",
                "model_not_found",
            )

    def check_plan(self, plan: str | None) -> None:
        """404 for a kv_plan that was not loaded with --plan; None means the default plan."""
        if plan is None or self.engine is None:
            return
        if plan not in self.engine.plans:
            raise APIError(
                404,
                f"kv_plan {shown(plan)} is not loaded; loaded plans: {', '.join(sorted(self.engine.plans))}",
                "kv_plan",
                "plan_not_found",
            )


def shown(name: str) -> str:
    """A client-chosen name quoted in a message: JSON-escaped (controls, lone surrogates)
    and cut short, so it can neither break the response nor flood the log."""
    text = printable(name)
    cut = text[:_MAX_SHOWN] + ("..." if len(text) > _MAX_SHOWN else "")
    return "`" + cut.encode("unicode_escape").decode("ascii") + "`" if not cut.isprintable() else f"`{cut}`"
