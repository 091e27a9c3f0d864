"""uvicorn with a drain in front of its shutdown.

Left to itself, uvicorn answers SIGTERM by closing the listening socket (new connections,
health probes included, are refused) and, after `timeout_graceful_shutdown`, cancelling
whatever still runs, which cuts event streams mid-body. Here the first SIGTERM (or
Ctrl-C) only starts ServerState.drain: the socket stays open so /health can answer 503,
in-flight requests get --drain-timeout to finish, the rest end with finish_reason
"abort" and [DONE]; then uvicorn is told to exit, with nothing left to cut. A second
signal is uvicorn's own: exit now."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from headwise.server.state import ABORT_GRACE_S, ServerState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_begun = False
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_begun or self._loop is None:
            super().handle_exit(sig, frame)
            return
        log.info("signal %d: draining for up to %.1f s (send it again to exit at once)", sig, self._drain_timeout)
        self.begin_drain()

    def begin_drain(self) -> None:
        """Drain, then exit; safe from any thread or a signal handler, idempotent."""
        if self._drain_begun:
            return
        self._drain_begun = True
        if self._loop is None:  # not serving yet: nothing to drain
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The engine stops and the last responses go out while the socket still listens
        (probes keep getting 503 draining); only then does uvicorn close the socket, with
        nothing left to wait for, so the process exits right after."""
        if self._drain_begun and not self.force_exit:
            await self._state.shutdown()
            await self._wait_for_requests(ABORT_GRACE_S)
        await super().shutdown(sockets)

    async def _wait_for_requests(self, timeout: float) -> None:
        """Until no request task is older than this call (new probes come and go), or `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(self.server_state.tasks)
        while pending & self.server_state.tasks and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.02)

    async def _drain_then_exit(self) -> None:
        try:
            await self._state.drain(self._drain_timeout)
        finally:
            # what is left are connections finishing their last bytes; do not wait another drain
            self.config.timeout_graceful_shutdown = ABORT_GRACE_S
            self.should_exit = True
