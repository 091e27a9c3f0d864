"""`X-Request-Id`: taken from the request (or made up) and echoed on every response,
errors and event streams included; handlers read it from `request.state.request_id`."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/=+-]")
MAX_LEN = 128


def clean_request_id(raw: str) -> str:
    """Keep a client id printable and short enough to log; empty -> a fresh id."""
    cleaned = _UNSAFE.sub("", raw)[:MAX_LEN]
    return cleaned or uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming and disconnects pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER)
        request_id = clean_request_id(given.decode("latin-1")) if given else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER]
                message["headers"] = headers + [(HEADER, request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)
