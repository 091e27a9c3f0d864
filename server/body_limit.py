"""`--max-request-bytes` and `--body-timeout`: a body over the size limit gets 413 before
anything parses it, one that has not fully arrived in time gets 408.

A declared Content-Length over the limit is refused without reading a byte; a body sent
without one (chunked) is counted as it arrives and refused as soon as it passes the
limit. A body within the limit is buffered here and handed on whole, which is what
FastAPI would do anyway; messages after it (the disconnect that streaming responses
listen for) pass straight through. The time limit is for the whole body, not per chunk:
a client sending a byte every 2 s must not hold its connection and a task for ever."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from headwise.server.errors import APIError


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)",
        None,
        "request_too_large",
    )


def too_slow(timeout: float) -> APIError:
    return APIError(
        408,
        f"the request body did not arrive within this server's {timeout:g} s (--body-timeout)",
        None,
        "request_timeout",
        {"Connection": "close"},
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left while sending
                        await self.app(scope, _replay([message], receive), send)
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        break
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await too_slow(self.timeout).response()(scope, receive, send)
            return
        if size > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
