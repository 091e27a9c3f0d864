"""Torch reference of every kernel op: defines what is correct, runs anywhere. This module
is the reference backend `kernels/ops.py` dispatches to (every op by name): the paged-cache
attention ops live here; the CPU serving path's prefill attention in kernels/reference_cpu.py,
the per-layer model ops (RMSNorm, RMSNorm with the residual add, RoPE) in
kernels/reference_layer.py, the slot gathers and masks they share in
kernels/reference_cache.py.

Cache layout (docs/design.md, "KV cache"): one pool shared by all layers and KV heads,
`k_cache` / `v_cache` `[num_blocks, block_size, head_dim]` and `pos_cache`
`[num_blocks, block_size]` (int32, the token position stored in each slot).
A (sequence, KV head) owns a list of blocks: `block_tables[rows[s], h, i]` is its i-th
block, `lengths[s, h]` its number of valid slots (slot r lives in block r // bs). Block
tables are the engine's persistent per-layer tables `[R, Hkv, W]` (one row per running
request); `rows [S]` names the row of each sequence of the call.

Mask of a bounded head with `(keep, recent)` over cached slots: slot r is visible to
a query at position p iff `r < keep` (sinks and selected tokens, always kept) or
`pos[r] > p - recent` (the recent ring). Full heads use a huge `recent`.
Inside a chunk (no cache) the same rule is stated on positions with `sink`:
key j visible to query i iff `j <= i` and (`j < sink` or `j > i - recent`).

An 8-bit (fp8) cache holds `x / scale` with a float32 scale per KV head of the layer
(`k_scale` / `v_scale [Hkv]`, None for a cache in the model's dtype): kv_write quantizes,
every op that reads the cache dequantizes right after its gather (kernels/kv_quant.py).

Log-sum-exp values are natural-log, float32; an empty row gives output 0, lse -inf.
"""

from __future__ import annotations

import torch

from headwise.kernels import cpu_ops
from headwise.kernels.kv_quant import dequantize, is_fp8, quantize
from headwise.kernels.reference_cache import (
    NO_POSITION,
    cached_keys,
    chunk_visible,
    flash_cpu,
    merge_states,
    softmax_av,
)
from headwise.kernels.reference_cpu import causal_prefill, masked_prefill
from headwise.kernels.reference_layer import add_rms_norm, apply_rotary, rms_norm

# the ops of the reference backend (kernels/ops.py), the re-exported ones included
__all__ = [
    "kv_write",
    "paged_decode",
    "paged_prefix",
    "sink_window_prefill",
    "merge_states",
    "masked_prefill",
    "causal_prefill",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
]


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v `[T, Hkv, D]` to flat slots `slot_mapping [T, Hkv]` (-1 = drop); an fp8
    cache stores `x / scale` per KV head (`k_scale` / `v_scale [Hkv]`, kernels/kv_quant.py)."""
    d = k.shape[-1]
    slots = slot_mapping.reshape(-1).long()
    dropped = slots < 0
    # a decode step of full heads keeps every row: no boolean indexing (each one a nonzero)
    kept = None if not bool(dropped.any()) else (~dropped).nonzero().squeeze(1)
    if kept is not None:
        slots = slots.index_select(0, kept)

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        return x if kept is None else x.index_select(0, kept)

    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if is_fp8(cache.dtype):  # torch has no fp8 index_copy on the CPU: copy the bytes
            assert scale is not None, "an fp8 cache needs its scales"
            rows = rows_of(quantize(x, scale, cache.dtype).reshape(-1, d))
            cache.view(torch.uint8).view(-1, d).index_copy_(0, slots, rows.view(torch.uint8))
        else:
            cache.view(-1, d).index_copy_(0, slots, rows_of(x.reshape(-1, d)).to(cache.dtype))
    pos = positions.to(pos_cache.dtype)[:, None].expand(slot_mapping.shape).reshape(-1)
    pos_cache.view(-1).index_copy_(0, slots, rows_of(pos))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    recent: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence, `q [B, Hq, D]` at positions `q_pos [B]`, over the valid
    slots of each KV head with the (keep, recent) mask of `paged_prefix`: a window head's
    oldest block may still hold positions that left its window.

    block_tables `[R, Hkv, W]`, rows `[B]`, lengths / keep / recent `[B, Hkv]` (the new
    token is written before this call). Returns out `[B, Hq, D]` and lse `[B, Hq]`.

    On the CPU the G query heads of a KV head are the G query rows of one fused flash call
    (torch's CPU kernel, fp32, with an additive mask), so a layer's decode is a dozen ops
    whatever the batch; elsewhere scores, mask and softmax are plain tensor ops. While every
    head's window still reaches position 0 (full heads; window heads younger than their
    window) no slot has left a window or been released, and the mask is just
    `slot < length`: the slot positions are not gathered. With an fp32 cache and no fp8
    scales the C++ op of `kernels/cpu_ops.py` reads the blocks in place instead of gathering
    them, with the plain mask or, once a window moved, the (keep, recent) one.
    """
    b, hq, d = q.shape
    hkv = block_tables.shape[1]
    bs = k_cache.shape[1]
    if b == 0:
        return q.new_zeros(0, hq, d), torch.zeros(0, hq, dtype=torch.float32, device=q.device)
    reach = q_pos.long()[:, None] - recent.long()  # a slot is recent iff its position > reach
    moved = bool((reach >= 0).any())
    if k_scale is None and cpu_ops.serves(q, k_cache):
        window = (pos_cache, keep, reach) if moved else ()  # unmoved: every slot below the length
        return cpu_ops.paged_decode(q, k_cache, v_cache, block_tables, rows, lengths, scale, *window)
    shortest, longest = (int(x) for x in lengths.aminmax())
    nblocks = max(1, -(-longest // bs))
    ids = block_tables[rows.long(), :, :nblocks]  # [B, Hkv, nblocks]
    flat = ids.clamp(min=0).reshape(-1)
    k = dequantize(k_cache.index_select(0, flat).view(b, hkv, nblocks * bs, d), k_scale, 1)
    v = dequantize(v_cache.index_select(0, flat).view(b, hkv, nblocks * bs, d), v_scale, 1)
    n = torch.arange(nblocks * bs, device=q.device)
    visible = n < lengths[:, :, None]  # [B, Hkv, N]
    exact = shortest > 0
    if moved:
        kpos = pos_cache.index_select(0, flat).view(b, hkv, nblocks * bs).long()
        kpos.masked_fill_((ids < 0).repeat_interleave(bs, dim=-1), NO_POSITION)
        visible &= (n < keep[:, :, None]) | (kpos > reach[:, :, None])
        exact = False
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    if q.device.type != "cpu":
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, N]
        scores.masked_fill_(~visible[:, :, None, :], float("-inf"))
        out, lse = softmax_av(scores, v, q.dtype)
        return out.reshape(b, hq, d), lse.reshape(b, hq)
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, float("-inf"))
    out, lse = flash_cpu(qg, k, v, False, scale, mask[:, :, None, :])
    if not exact:  # a head that sees nothing: output 0 (the kernel's) and lse -inf
        lse.masked_fill_(~visible.any(-1)[:, :, None], float("-inf"))
    return out.to(q.dtype).reshape(b, hq, d), lse.reshape(b, hq)


def paged_prefix(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    q_seq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    recent: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk queries `q [T, Hq, D]` (positions `q_pos`, sequence `q_seq` in [0, S))
    against the cached slots of their sequence, with the (keep, recent) mask.

    block_tables `[R, Hkv, W]`, rows `[S]`, lengths / keep / recent `[S, Hkv]`.
    Returns out `[T, Hq, D]` and lse `[T, Hq]`.
    """
    t, hq, d = q.shape
    hkv = block_tables.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    table_rows = rows.tolist()
    # one gather per sequence, shared by all of its query tokens
    for s in torch.unique(q_seq).tolist():
        tokens = (q_seq == s).nonzero().flatten()
        row = table_rows[s]
        cached = cached_keys(
            k_cache,
            v_cache,
            pos_cache,
            block_tables[row : row + 1],
            lengths[s],
            keep[s],
            recent[s],
            q_pos[tokens],
            torch.float32,
            k_scale,
            v_scale,
        )
        if cached is None:
            continue
        k, v, visible = cached
        qg = q[tokens].float().view(-1, hkv, hq // hkv, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
        scores = torch.matmul(qg, k[:, None].transpose(-1, -2)) * scale  # [Hkv, G, n, N]
        scores.masked_fill_(~visible[:, None], float("-inf"))
        o, l = softmax_av(scores, v[:, None], q.dtype)
        out[tokens] = o.permute(2, 0, 1, 3).reshape(-1, hq, d)
        lse[tokens] = l.permute(2, 0, 1).reshape(-1, hq)
    return out, lse


def sink_window_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sink: torch.Tensor,
    recent: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention inside each chunk with the per-head (sink, recent) mask.

    q `[T, Hq, D]`, k / v `[T, Hkv, D]`, positions `[T]`, cu_seqlens `[S + 1]`
    (sequence s owns rows cu[s]:cu[s+1]), sink / recent `[S, Hkv]`.
    Returns out `[T, Hq, D]` and lse `[T, Hq]`.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        if a == b:
            continue
        visible = chunk_visible(positions[a:b], sink[s], recent[s])  # [Hkv, n, n]
        qs = q[a:b].float().view(b - a, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
        ks = k[a:b].float().permute(1, 0, 2)  # [Hkv, n, D]
        vs = v[a:b].float().permute(1, 0, 2)
        scores = torch.matmul(qs, ks[:, None].transpose(-1, -2)) * scale  # [Hkv, G, n, n]
        scores.masked_fill_(~visible[:, None], float("-inf"))
        o, l = softmax_av(scores, vs[:, None], q.dtype)
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, hq, d)
        lse[a:b] = l.permute(2, 0, 1).reshape(b - a, hq)
    return out, lse
