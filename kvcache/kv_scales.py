"""`--kv-scales FILE`: fixed fp8 scales of K and V per (layer, KV head), instead of
calibrating them from the first prompt.

The file is JSON, in the model's head numbering (what a tensor-parallel rank keeps is its
own columns):

    {"format": "headwise-kv-scales/1", "k_scale": [[s, ...] x kv_heads] x layers,
     "v_scale": [[...]]}

A scale is the float32 the cache multiplies its 8-bit values by (vLLM's `k_scale`), so it
is about a head's absmax / 448 (e4m3); values beyond scale x the format's max saturate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

FORMAT = "headwise-kv-scales/1"


class KVScalesError(ValueError):
    """A --kv-scales file that is unreadable or does not fit the model."""


def load_kv_scales(path: str, layers: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_scale, v_scale) `[layers, kv_heads]` float32 from `path`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise KVScalesError(f"{path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise KVScalesError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KVScalesError(
            f"{path}: format: expected {FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}"
        )
    out = []
    for key in ("k_scale", "v_scale"):
        rows = data.get(key)
        if not isinstance(rows, list) or len(rows) != layers:
            raise KVScalesError(f"{path}: {key}: expected {layers} layers of {kv_heads} scales")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != kv_heads:
                raise KVScalesError(f"{path}: {key}[{i}]: expected {kv_heads} scales, got {row!r}")
            for h, s in enumerate(row):
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                    raise KVScalesError(f"{path}: {key}[{i}][{h}]: must be a finite number > 0, got {s!r}")
        out.append(torch.tensor(rows, dtype=torch.float32))
    return out[0], out[1]


def save_kv_scales(path: str, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "k_scale": k_scale.tolist(), "v_scale": v_scale.tolist()}, f)
        f.write("\n")


def rank_columns(scales: torch.Tensor, order: Sequence[Sequence[int]], rank: int, ranks: int) -> torch.Tensor:
    """The columns of `scales [L, Hkv]` (model numbering) that `rank` holds, in its tables'
    order: `order[layer]` lists the model's heads rank-major (kvcache/sharding.py)."""
    k = scales.shape[1] // ranks
    return torch.stack([scales[l, list(row[rank * k : (rank + 1) * k])] for l, row in enumerate(order)])


def rank_scales(path: str | None, layers: int, kv_heads: int, order: Sequence[Sequence[int]], rank: int, ranks: int):
    """`(k, v)` scales `[L, Hkv / ranks]` of `rank`'s heads from the file at `path`, or None
    without one (the first prefill calibrates them)."""
    if path is None:
        return None
    k, v = load_kv_scales(path, layers, kv_heads)
    return rank_columns(k, order, rank, ranks), rank_columns(v, order, rank, ranks)
