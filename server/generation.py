"""One HTTP request's engine requests (n choices x prompts), run together.

Each engine request is pumped by its own task; since outputs are cumulative, only the latest
output per choice is kept, so a slow reader sees fewer, larger updates instead of a backlog.
Closing the group (disconnect, error, done) cancels the pumps, which aborts whatever is
still in the engine and frees its blocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from headwise.engine.async_engine import AsyncEngine
from headwise.engine.outputs import RequestOutput
from headwise.engine.sampling_params import SamplingParams
from headwise.server.admission import Admission
from headwise.server.metrics import ServerMetrics


@dataclass
class Job:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class GenerationGroup:
    def __init__(
        self, engine: AsyncEngine, jobs: list[Job], plan: str | None, metrics: ServerMetrics, admission: Admission
    ) -> None:
        admission.acquire(len(jobs))
        self._engine = engine
        self._jobs = jobs
        self._plan = plan
        self._metrics = metrics
        self._admission = admission
        self.latest: list[RequestOutput | None] = [None] * len(jobs)
        self._dirty: set[int] = set()
        self._error: BaseException | None = None
        self._changed = asyncio.Event()  # for updates()
        self._progress = asyncio.Event()  # for start()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def start(self) -> None:
        """Submit every job and wait for each one's first output, so that parameter and
        context errors surface here, before any response header is sent."""
        self._tasks = [asyncio.create_task(self._pump(i, job)) for i, job in enumerate(self._jobs)]
        while self._error is None and any(out is None for out in self.latest):
            await self._progress.wait()
            self._progress.clear()
        if self._error is not None:
            await self.close()
            raise self._error

    async def updates(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Batches of (choice index, latest output) for choices that changed, until all finish."""
        while True:
            if self._error is not None:
                raise self._error
            if self._dirty:
                batch = [(i, self.latest[i]) for i in sorted(self._dirty)]
                self._dirty.clear()
                yield batch
                continue
            if all(out is not None and out.finished for out in self.latest):
                return
            await self._changed.wait()
            self._changed.clear()

    async def collect(self) -> list[RequestOutput]:
        """Run to the end and return every job's final output."""
        try:
            await self.start()
            async for _ in self.updates():
                pass
            return [out for out in self.latest if out is not None]
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel unfinished pumps (aborting their engine requests); idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # a pump cancelled while its request was being added never reaches the generator's
        # own abort; an explicit abort (queued after the add) covers that window
        for job, out in zip(self._jobs, self.latest):
            if self._tasks and (out is None or not out.finished):
                await self._engine.abort(job.request_id)
        self._admission.release(len(self._jobs))

    async def _pump(self, index: int, job: Job) -> None:
        timer = self._metrics.track()
        outputs = self._engine.generate(job.request_id, job.prompt_ids, job.params, plan=self._plan)
        try:
            async for out in outputs:
                timer.observe(out)
                self.latest[index] = out
                self._dirty.add(index)
                self._changed.set()
                self._progress.set()
        except Exception as e:  # handed to the reader: validation errors and engine faults alike
            if self._error is None:
                self._error = e
            self._changed.set()
            self._progress.set()
        finally:
            await outputs.aclose()
