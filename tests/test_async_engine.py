"""AsyncEngine: a request cancelled while its add is still queued is aborted, not orphaned."""

from __future__ import annotations

import asyncio
import threading

from headwise.engine.async_engine import AsyncEngine
from headwise.engine.sampling_params import SamplingParams


def test_cancel_while_the_add_is_queued_aborts_the_request(make_engine, tok):
    eng = make_engine(kv_cache_mb=16)
    a = AsyncEngine(eng)
    a._thread = threading.Thread(target=lambda: None)  # "running", but commands wait for us

    async def scenario():
        async def consume():
            async for _ in a.generate("r", tok("hello there")["input_ids"], SamplingParams(max_tokens=50)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)  # generate() now waits for the worker to accept the add
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # the worker wakes up late: it applies the add, then the abort queued behind it
        a._apply_commands()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert a.num_unfinished == 0
    assert not eng.has_unfinished_requests()
    assert eng.stats().num_free_blocks == eng.stats().num_blocks
