"""Run the server inside the current process on a free 127.0.0.1 port, in a thread: for
notebooks, scripts that embed headwise, and the test suite's live-server tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx

from headwise.engine.llm_engine import LLMEngine
from headwise.server.app import create_app
from headwise.server.drain import DrainingServer
from headwise.server.http_protocol import uvicorn_config
from headwise.server.settings import ServerSettings
from headwise.server.state import ServerState


class BackgroundServer:
    """`with BackgroundServer(settings, load_engine) as server: ... server.url ...`

    Entering waits until the port accepts connections (and, with `wait_ready`, until
    /health is 200); leaving drains (as on SIGTERM) and stops the server and its engine
    worker. `begin_drain()` starts that drain without waiting for it."""

    def __init__(
        self,
        settings: ServerSettings,
        load_engine: Callable[[], LLMEngine],
        wait_ready: bool = True,
        timeout: float = 120.0,
    ) -> None:
        self.app = create_app(settings, load_engine)
        self.state: ServerState = self.app.state.headwise
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((settings.host, settings.port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{settings.host}:{self.port}"
        config = uvicorn_config(self.app, settings, log_level="warning")
        self._server = DrainingServer(config, self.state, settings.drain_timeout)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="headwise-http", daemon=True
        )
        self._wait_ready = wait_ready
        self._timeout = timeout

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup")
            try:
                status = httpx.get(self.url + "/health", timeout=1.0).status_code
            except httpx.HTTPError:
                status = None
            if status == 200 or (status is not None and not self._wait_ready):
                return self
            if self.state.load_error is not None:
                self.stop()
                raise RuntimeError(f"the model failed to load: {self.state.load_error}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the server at {self.url} was not ready within {self._timeout} s")

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def begin_drain(self) -> None:
        """What SIGTERM does to `headwise serve`: /health 503, drain, exit."""
        self._server.begin_drain()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.begin_drain()
            self._thread.join()
        self._sock.close()
