"""Tokenization and chat templating off the event loop.

A multi-megabyte prompt takes seconds to tokenize; on the loop it would stall /health and
every stream for that long. The work goes to one worker thread, as vLLM does: a fast
tokenizer is shared with the engine's detokenizer and is not safe to use from many
threads at once, and the Rust part of encoding releases the GIL, so one thread keeps the
loop free without contention."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class TokenizerThread:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headwise-tokenize")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on the tokenizer thread; its exception is re-raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
