"""Run the app under uvicorn until SIGTERM / Ctrl-C, draining in-flight requests first."""

from __future__ import annotations

import logging
import signal

import uvicorn

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.app import create_app
from headwise.server.settings import ServerSettings

log = logging.getLogger(__name__)


def serve(settings: ServerSettings, engine_config: EngineConfig) -> int:
    """Serve until told to stop; 0 after a clean drain, 1 if the model failed to load."""
    logging.getLogger().setLevel(settings.log_level.upper())
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_failure(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, lambda: LLMEngine(engine_config), stop_on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout, access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM it handled once it has drained; a no-op handler turns
    # that into a normal return so a drained shutdown exits 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failures:
        log.error("exiting: the model did not load (%s)", failures[0])
        return 1
    return 0
