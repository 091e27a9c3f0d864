"""The CPU serving path's prefill attention (torch references, kernels/reference.py's contract):
`masked_prefill` (a chunk over its cached slots and itself in one masked SDPA call per
sequence; torch's fused flash attention, merged by log-sum-exp, where every query sees the
whole history) and `causal_prefill` (every head full, nothing cached)."""

from __future__ import annotations

import torch

from headwise.kernels import cpu_ops
from headwise.kernels.kv_quant import dequantize
from headwise.kernels.reference_cache import cached_keys, chunk_visible, flash_cpu, gather_slots, merge_states


def masked_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    sink: torch.Tensor,
    recent: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_prefix + sink_window_prefill + merge_states in one masked SDPA call per
    sequence (the CPU serving path: torch's fused CPU attention, no log-sum-exp).

    Keys are the sequence's cached slots followed by the chunk's own K/V; the mask is the
    union of both ops' masks, so the output equals theirs. Arguments as in those two ops
    (lengths / keep / sink / recent `[S, Hkv]` for sequence s = tokens cu[s]:cu[s+1], whose
    table is `block_tables[rows[s]]`). Every query must see at least itself: recent >= 1.
    Returns `[T, Hq, D]`.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    table_rows = rows.tolist()
    whole = _sees_whole_history(positions, bounds, lengths, recent) if q.device.type == "cpu" else {}
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        if a == b:
            continue
        n = b - a
        if s in whole:
            row = table_rows[s]
            out[a:b] = _whole_history_attention(
                q[a:b], k[a:b], v[a:b], k_cache, v_cache, block_tables[row], whole[s], scale, k_scale, v_scale
            )
            continue
        visible = chunk_visible(positions[a:b], sink[s], recent[s])  # [Hkv, n, n]
        ks, vs = k[a:b].permute(1, 0, 2), v[a:b].permute(1, 0, 2)  # [Hkv, n, D]
        row = table_rows[s]
        cached = cached_keys(
            k_cache,
            v_cache,
            pos_cache,
            block_tables[row : row + 1],
            lengths[s],
            keep[s],
            recent[s],
            positions[a:b],
            q.dtype,
            k_scale,
            v_scale,
        )
        if cached is not None:
            kc, vc, vis_cache = cached
            ks, vs = torch.cat([kc, ks], 1), torch.cat([vc, vs], 1)
            visible = torch.cat([vis_cache, visible], 2)
        qs = q[a:b].view(n, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
        uniform = bool((visible == visible[:1]).all())
        if uniform:  # one mask for every head: a single call over all query heads
            o = torch.nn.functional.scaled_dot_product_attention(
                qs.reshape(1, hq, n, d), ks[None], vs[None], attn_mask=visible[0], scale=scale, enable_gqa=True
            )
            o = o[0].view(hkv, g, n, d)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, ks[:, None], vs[:, None], attn_mask=visible[:, None], scale=scale
            )  # [Hkv, G, n, D]
        out[a:b] = o.permute(2, 0, 1, 3).reshape(n, hq, d)
    return out


def _sees_whole_history(
    positions: torch.Tensor, bounds: list[int], lengths: torch.Tensor, recent: torch.Tensor
) -> dict[int, list[int]]:
    """{sequence: cached slots per KV head} of the chunks whose every query sees all of its
    sequence's written slots and, causally, the whole chunk: every head's window reaches past
    position 0 (recent > the chunk's last position, so sink and keep change nothing). Their
    mask is plain causal over [cache; chunk]; heads may hold different numbers of slots (a
    bounded select head holds its candidates, kvcache/prefill_selection.py)."""
    ends = torch.tensor([b - 1 for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dtype=torch.long)
    if ends.numel() == 0:
        return {}
    seqs = [s for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    last = positions[ends].long()
    wide = (recent[seqs].long().min(1).values > last).tolist()
    return {s: n for s, w, n in zip(seqs, wide, lengths[seqs].tolist()) if w}


def _whole_history_attention(
    q, k, v, k_cache, v_cache, table, n_cached: list[int], scale: float, k_scale=None, v_scale=None
) -> torch.Tensor:
    """One chunk `q [n, Hq, D]`, `k / v [n, Hkv, D]` over each KV head's first `n_cached[h]`
    cached slots (table `[Hkv, W]`) and itself, causally: no mask is materialised. The chunk's
    causal part and the (unmasked) cached part are fused calls merged by their log-sum-exp,
    one cached call per distinct slot count."""
    q4 = q.transpose(0, 1)[None]
    o, lse = flash_cpu(q4, k.transpose(0, 1)[None], v.transpose(0, 1)[None], True, scale)
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    for n in sorted(set(n_cached)):
        if not n:
            continue
        heads = [h for h in range(hkv) if n_cached[h] == n]
        nb = -(-n // k_cache.shape[1])
        if len(heads) == hkv:
            kc = dequantize(gather_slots(k_cache, table[None], nb)[:, :, :n], k_scale, 1).to(q.dtype)
            vc = dequantize(gather_slots(v_cache, table[None], nb)[:, :, :n], v_scale, 1).to(q.dtype)
            oc, lsec = flash_cpu(q4, kc, vc, False, scale)
            o, _ = merge_states(o, lse, oc, lsec)
            continue
        idx = torch.tensor(heads, device=q.device)
        cols = (idx[:, None] * g + torch.arange(g, device=q.device)[None, :]).reshape(-1)
        sub = table.index_select(0, idx)[None]
        ks = k_scale.index_select(0, idx) if k_scale is not None else None
        vs = v_scale.index_select(0, idx) if v_scale is not None else None
        kc = dequantize(gather_slots(k_cache, sub, nb)[:, :, :n], ks, 1).to(q.dtype)
        vc = dequantize(gather_slots(v_cache, sub, nb)[:, :, :n], vs, 1).to(q.dtype)
        oc, lsec = flash_cpu(q4[:, cols].contiguous(), kc, vc, False, scale)
        merged, merged_lse = merge_states(o[:, cols], lse[:, cols], oc, lsec)
        o[:, cols], lse[:, cols] = merged.to(o.dtype), merged_lse
    return o[0].transpose(0, 1)


def causal_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sink: torch.Tensor | None = None,
    recent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention inside each chunk when nothing is cached (tokens at positions 0, 1,
    ...; no log-sum-exp needed): every head full, or with `sink / recent [S, Hkv]` (recent >= 1)
    `sink_window_prefill`'s per-head mask. torch SDPA, which has fused CPU and GPU kernels;
    fp32 on the CPU with head_dim 64 or 128 takes cpu_ops' C++ kernel instead, which skips the
    key blocks a window head's queries do not see."""
    if q.shape[-1] in (64, 128) and cpu_ops.serves(q, k, v):
        return cpu_ops.causal_prefill(q, k, v, cu_seqlens, scale, sink, recent)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a == b:
            continue
        # 4-d inputs: 3-d ones take SDPA's unfused math path on CPU (5x slower)
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        if sink is None or recent is None:
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            g = q.shape[1] // k.shape[1]
            visible = chunk_visible(torch.arange(b - a, device=q.device), sink[s], recent[s])  # [Hkv, n, n]
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=visible.repeat_interleave(g, 0)[None], scale=scale, enable_gqa=True
            )
        out[a:b] = o[0].transpose(0, 1)
    return out
