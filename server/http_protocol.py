"""uvicorn's h11 protocol with a deadline on the request head, and the uvicorn config both
`headwise serve` and BackgroundServer run with.

uvicorn has no read timeout: its keep-alive timer is cancelled by the first byte of the
next request, so a client that sends a header byte every 2 s (slow loris) holds its
connection for ever. Here a connection must deliver a complete request line and headers
within `--header-timeout` of its first byte (or of connecting); otherwise it gets a 408
and is closed. The body has its own limit (`--body-timeout`, server/body_limit.py)."""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from headwise.server.settings import ServerSettings

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
_TIMEOUT_BODY = (
    b'{"error":{"message":"the request headers did not arrive within this server\'s --header-timeout",'
    b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}'
)


class HeadTimeoutH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set per server by `with_header_timeout`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first byte of a kept-alive connection's next request
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request head is in
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # between requests uvicorn's keep-alive timer runs; ours starts at the next byte
        self._disarm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.logger.info("closing a connection whose request head took over %.1f s", self.header_timeout)
        self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeadTimeoutH11Protocol]:
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"header_timeout": seconds})


def uvicorn_config(app, settings: ServerSettings, **overrides) -> uvicorn.Config:
    """The config of a headwise server: the timed h11 protocol, the drain's shutdown grace."""
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.drain_timeout,
        "access_log": False,
        "http": with_header_timeout(settings.header_timeout),
        **overrides,
    }
    return uvicorn.Config(app, **options)
