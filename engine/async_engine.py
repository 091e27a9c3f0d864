"""AsyncEngine: the engine loop on a worker thread, per-request async streams.

The HTTP side never touches tensors: requests and aborts are queued to the worker,
which applies them between steps; outputs are handed back to each request's asyncio
queue with `call_soon_threadsafe`.

A request the engine fails (LLMEngine.fail_request) raises RequestFailed in its own
stream only. Any other exception out of a step leaves the engine in an unknown state: the
loop stops, every open stream gets EngineDead, and `on_death` tells the owner (the
server exits so that an orchestrator restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from headwise.engine.errors import RequestFailed
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.outputs import RequestOutput
from headwise.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine loop stopped after an internal error."""


@dataclass
class _Stream:
    """Where a request's outputs go: its caller's event loop and queue."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    plan: str | None
    stream: _Stream
    added: asyncio.Future  # resolved once the engine accepted (or refused) the request


@dataclass
class _Abort:
    request_id: str


class _AbortAll:
    pass


_Command = _Add | _Abort | _AbortAll


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None):
        """`on_death(error)` is called from the worker thread once the loop has stopped on an
        engine fault and failed every open stream."""
        self.engine = engine
        self.on_death = on_death
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="headwise-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with `drain`, first let in-flight requests finish."""
        if drain:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while self.num_unfinished and (deadline is None or loop.time() < deadline):
                await asyncio.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # -- requests --------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, plan: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; stopping the iteration aborts it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()
        # under the lock the worker takes to fail leftover adds: no add slips in after that
        with self._lock:
            if self.error is not None:
                raise EngineDead(f"engine stopped: {self.error}")
            if self._stop.is_set() or self._thread is None:
                raise EngineDead("engine is not running")
            self._commands.put(_Add(request_id, prompt_token_ids, params, plan, _Stream(loop, q), added))
        self._wake.set()
        try:
            await added  # raises the engine's InvalidRequest / UnknownPlan / PromptTooLong
        except asyncio.CancelledError:
            # the add is already queued: abort it behind it so no orphan runs to completion
            self._abort_now(request_id)
            raise
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                if out.error is not None:
                    finished = True  # the engine has ended it and freed its blocks
                    raise RequestFailed(out.request_id, out.error)
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))
        self._wake.set()

    def abort_all(self) -> None:
        """End every open request now with finish_reason "abort", delivered to its stream as
        a final output (a drain past its deadline), unlike `abort`, whose caller has stopped
        listening."""
        self._commands.put(_AbortAll())
        self._wake.set()

    # -- the worker ------------------------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.plan)
                    self._streams[cmd.request_id] = cmd.stream
                    _resolve(cmd.stream.loop, cmd.added, None)
                except Exception as e:
                    _resolve(cmd.stream.loop, cmd.added, e)
            elif isinstance(cmd, _Abort):
                if cmd.request_id in self._streams:
                    self.engine.abort_request(cmd.request_id)
                    self._streams.pop(cmd.request_id, None)
            else:
                for rid in list(self._streams):
                    self.engine.abort_request(rid)  # the stream stays: it gets the "abort" output

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands()
                busy = self.engine.has_unfinished_requests()
                # when idle, the step only flushes the final outputs of aborted requests
                self._deliver(self.engine.step())
                if not busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # an engine fault: fail every open stream, stop
            log.exception("engine loop failed; the engine is dead")
            with self._lock:
                self.error = e
            for stream in list(self._streams.values()):
                dead = EngineDead(f"engine fault: {type(e).__name__}: {e}")
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)
            self._streams.clear()
            if self.on_death is not None:
                self.on_death(e)
        finally:
            with self._lock:
                self._apply_failed_adds()

    def _apply_failed_adds(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                _resolve(cmd.stream.loop, cmd.added, EngineDead("engine is shut down"))


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, error: BaseException | None) -> None:
    def set_() -> None:
        if fut.done():  # the caller went away
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    loop.call_soon_threadsafe(set_)
