"""What a forward pass sees of the KV cache on one rank: the device block tables, the pool
tensors and the block size. Rank 0 takes it from `KVCacheManager.worker_view()`; a
tensor-parallel worker builds its own (it holds no host bookkeeping: rank 0 sends it the
table edits and compaction moves each step)."""

from __future__ import annotations

from dataclasses import dataclass

from headwise.kvcache.block_tables import DeviceTables
from headwise.kvcache.buffers import KVBuffers


@dataclass
class WorkerKV:
    tables: DeviceTables
    buffers: KVBuffers
    block_size: int
    first_head: int = 0  # this rank's first KV head column (tensor parallelism: rank x heads per rank)
