"""The engine's counters at one moment (what /metrics and `bench` read)."""

from __future__ import annotations

from dataclasses import dataclass

from headwise.engine.scheduler import Scheduler


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    kv_cache_usage: float
    num_preemptions: int
    kv_bytes_saved: int  # cumulative K/V bytes plans kept out of the pool vs the full cache
    block_bytes: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which served from it
    num_cached_blocks: int = 0  # evictable blocks (counted as free)


def collect_stats(scheduler: Scheduler, kv_bytes_saved: int) -> EngineStats:
    kv = scheduler.kv_manager
    total = kv.num_blocks
    cache = kv.prefix_cache
    return EngineStats(
        len(scheduler.running),
        len(scheduler.waiting),
        kv.num_free,
        total,
        1 - kv.num_free / total,
        scheduler.num_preemptions,
        kv_bytes_saved,
        kv.block_bytes,
        cache.queries if cache else 0,
        cache.hits if cache else 0,
        kv.pool.num_evictable,
    )
