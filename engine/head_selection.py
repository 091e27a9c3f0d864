"""The end of a selecting prompt: which heads stay full (dynamic plans) and which middle
tokens the select heads keep, then their compaction (docs/design.md, "KV cache")."""

from __future__ import annotations

import torch

from headwise.engine.sequence import Sequence
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.selection import farthest_heads, head_distances


def select_and_compact(
    seq: Sequence, kv_manager: KVCacheManager, scores: torch.Tensor, outputs: torch.Tensor | None
) -> None:
    """`scores [L, Hkv, P]`: middle-token scores of every KV head; `outputs [L, W, Hq, D]`:
    the kept attention outputs (a dynamic plan picks per layer the heads farthest from the
    layer's mean output to stay full)."""
    layers, kv_heads = kv_manager.num_layers, kv_manager.num_kv_heads
    keep_full = torch.zeros(layers, kv_heads, dtype=torch.bool)
    dynamic = seq.plan.dynamic
    if dynamic is not None:
        assert outputs is not None  # asked for with a dynamic plan
        for layer in range(layers):
            keep_full[layer] = farthest_heads(head_distances(outputs[layer], kv_heads), dynamic.ratio)
    kv_manager.compact(seq.kv, keep_full, list(scores))
