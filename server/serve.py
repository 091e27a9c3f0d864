"""Run the app under uvicorn until SIGTERM / Ctrl-C, draining in-flight requests first.

Exit status: 0 after a drain; 1 when the model did not load or the engine died (after
failing the requests in flight), so that an orchestrator restarts the process."""

from __future__ import annotations

import logging
import signal

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.app import create_app
from headwise.server.drain import DrainingServer
from headwise.server.http_protocol import uvicorn_config
from headwise.server.settings import ServerSettings

log = logging.getLogger(__name__)


def serve(settings: ServerSettings, engine_config: EngineConfig) -> int:
    """Serve until told to stop; 0 after a clean drain, 1 if the model failed to load or the
    engine died."""
    logging.getLogger().setLevel(settings.log_level.upper())
    failures: list[BaseException] = []
    server: DrainingServer | None = None

    def stop_on_fatal(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, lambda: LLMEngine(engine_config), stop_on_fatal)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app.state.headwise, settings.drain_timeout)
    # uvicorn re-raises a second SIGTERM it handled once it has stopped; a no-op handler
    # turns that into a normal return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failures:
        state = app.state.headwise
        reason = "the model did not load" if state.load_error is not None else "the engine died"
        log.error("exiting with status 1: %s (%s)", reason, failures[0])
        return 1
    return 0
