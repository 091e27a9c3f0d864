"""Server-sent events, and cancellation of a request's work when its client goes away.

A client that disconnects must not keep its KV blocks: both the SSE response and the
non-streaming wait listen for `http.disconnect` and cancel the work, which closes the
GenerationGroup and aborts its engine requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    """One SSE event carrying a JSON object."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Disconnected(Exception):
    """The client closed the connection before the response was ready."""


class SSEResponse(StreamingResponse):
    """An event stream that always races the body against `http.disconnect` (Starlette
    skips that for ASGI spec 2.4 servers and would then notice only at the next write,
    which never comes while a request waits in the engine queue). `cleanup` runs however
    the stream ends."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", **(headers or {})})
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def run_then_cancel(func: Callable[[], Awaitable[None]]) -> None:
                    try:
                        await func()
                    except OSError:  # the socket is gone: same as a disconnect
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(run_then_cancel, lambda: self.stream_response(send))
                await run_then_cancel(lambda: self.listen_for_disconnect(receive))
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise Disconnected).

    The body has been read by then, so the next `receive()` only returns on disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise Disconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
