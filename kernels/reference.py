"""Torch reference of every kernel op: defines what is correct, runs anywhere.

Attention ops first, then the per-layer model ops (RMSNorm, RMSNorm with the residual
add, RoPE), which compute exactly what the unfused model does: normalisation in fp32
like Hugging Face's LlamaRMSNorm, rotation in fp32 from fp32 cos / sin.

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

from headwise.kernels.kv_quant import dequantize, is_fp8, quantize


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


def _gather(cache: torch.Tensor, tables: torch.Tensor, nblocks: int) -> torch.Tensor:
    """`[S, Hkv, nblocks * bs, ...]` view of the slots named by `tables[:, :, :nblocks]`."""
    idx = tables[:, :, :nblocks].long()
    # index_select of whole blocks, not advanced indexing: a plain row copy, 2.7x faster on
    # the CPU for a decode batch's K (16 sequences x 3 heads x 1008 slots). A released block
    # (-1, a window head's past) reads block 0; its slots are hidden by `_gather_pos`.
    g = cache.index_select(0, idx.clamp(min=0).reshape(-1))  # [S * Hkv * nblocks, bs, ...]
    return g.view(idx.shape[0], idx.shape[1], nblocks * cache.shape[1], *cache.shape[2:])


_NO_POSITION = -(2**30)  # far outside any window: a released block's slots stay invisible


def _gather_pos(pos_cache: torch.Tensor, tables: torch.Tensor, nblocks: int) -> torch.Tensor:
    """`_gather` of the slot positions `[S, Hkv, nblocks * bs]` (long), a released block's
    slots at `_NO_POSITION` so no recency test can see them."""
    pos = _gather(pos_cache, tables, nblocks).long()
    released = (tables[:, :, :nblocks] < 0).repeat_interleave(pos_cache.shape[1], dim=-1)
    return pos.masked_fill_(released, _NO_POSITION)


def _softmax_av(scores: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype):
    """Masked (-inf) scores `[..., N]` and values `[..., N, D]` -> (out, lse)."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])
    out = torch.matmul(p.to(v.dtype), v)
    return out.to(out_dtype), lse


def _cached_keys(k_cache, v_cache, pos_cache, table, lengths, keep, recent, q_pos, dtype, k_scale=None, v_scale=None):
    """One sequence's cached slots and which of them each query may see (the paged mask).

    table `[1, Hkv, max_blocks]`, lengths / keep / recent `[Hkv]`, q_pos `[n]`. Returns
    k, v `[Hkv, N, D]` in `dtype` and visible `[Hkv, n, N]`: slot r is visible iff it is
    written (r < length) and either kept for good (sink or selected, r < keep) or its
    position is inside the query's recent window. None when nothing is cached."""
    n_valid = int(lengths.max()) if lengths.numel() else 0
    if n_valid == 0:
        return None
    bs = k_cache.shape[1]
    nb = -(-n_valid // bs)
    k = dequantize(_gather(k_cache, table, nb)[0], k_scale, 0).to(dtype)
    v = dequantize(_gather(v_cache, table, nb)[0], v_scale, 0).to(dtype)
    kpos = _gather_pos(pos_cache, table, nb)[0]  # [Hkv, N]
    r = torch.arange(nb * bs, device=k.device)[None, None, :]
    qp = q_pos.long()[None, :, None]
    visible = (r < lengths.long()[:, None, None]) & (
        (r < keep.long()[:, None, None]) | (kpos[:, None, :] > qp - recent.long()[:, None, None])
    )
    return k, v, visible


def _chunk_visible(p: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """`[Hkv, n, n]`: key j of a chunk at positions `p` visible to query i iff j <= i and
    (j < sink or j > i - recent), per head."""
    qi, kj = p.long()[:, None], p.long()[None, :]
    win = (kj[None] < sink.long()[:, None, None]) | (kj[None] > qi[None] - recent.long()[:, None, None])
    return (kj <= qi)[None] & win


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
    `slot < length`: the slot positions are not gathered.
    """
    b, hq, d = q.shape
    hkv = block_tables.shape[1]
    bs = k_cache.shape[1]
    if b == 0:
        return q.new_zeros(0, hq, d), torch.zeros(0, hq, dtype=torch.float32, device=q.device)
    shortest, longest = (int(x) for x in lengths.aminmax())
    nblocks = max(1, -(-longest // bs))
    ids = block_tables[rows.long(), :, :nblocks]  # [B, Hkv, nblocks]
    flat = ids.clamp(min=0).reshape(-1)
    k = dequantize(k_cache.index_select(0, flat).view(b, hkv, nblocks * bs, d), k_scale, 1)
    v = dequantize(v_cache.index_select(0, flat).view(b, hkv, nblocks * bs, d), v_scale, 1)
    n = torch.arange(nblocks * bs, device=q.device)
    visible = n < lengths[:, :, None]  # [B, Hkv, N]
    reach = q_pos.long()[:, None] - recent.long()  # a slot is recent iff its position > reach
    exact = shortest > 0
    if bool((reach >= 0).any()):
        kpos = pos_cache.index_select(0, flat).view(b, hkv, nblocks * bs).long()
        kpos.masked_fill_((ids < 0).repeat_interleave(bs, dim=-1), _NO_POSITION)
        visible &= (n < keep[:, :, None]) | (kpos > reach[:, :, None])
        exact = False
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    if q.device.type != "cpu":
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, N]
        scores.masked_fill_(~visible[:, :, None, :], float("-inf"))
        out, lse = _softmax_av(scores, v, q.dtype)
        return out.reshape(b, hq, d), lse.reshape(b, hq)
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, float("-inf"))
    out, lse = _flash_cpu(qg, k, v, False, scale, mask[:, :, None, :])
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
        cached = _cached_keys(
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
        o, l = _softmax_av(scores, v[:, None], q.dtype)
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
        visible = _chunk_visible(positions[a:b], sink[s], recent[s])  # [Hkv, n, n]
        qs = q[a:b].float().view(b - a, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
        ks = k[a:b].float().permute(1, 0, 2)  # [Hkv, n, D]
        vs = v[a:b].float().permute(1, 0, 2)
        scores = torch.matmul(qs, ks[:, None].transpose(-1, -2)) * scale  # [Hkv, G, n, n]
        scores.masked_fill_(~visible[:, None], float("-inf"))
        o, l = _softmax_av(scores, vs[:, None], q.dtype)
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, hq, d)
        lse[a:b] = l.permute(2, 0, 1).reshape(b - a, hq)
    return out, lse


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax states over disjoint key sets: `[..., D]`, `[...]`."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe)[..., None]
    w2 = torch.exp(lse2 - safe)[..., None]
    out = o1.float() * w1 + o2.float() * w2
    return out.to(o1.dtype), lse


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
        visible = _chunk_visible(positions[a:b], sink[s], recent[s])  # [Hkv, n, n]
        ks, vs = k[a:b].permute(1, 0, 2), v[a:b].permute(1, 0, 2)  # [Hkv, n, D]
        row = table_rows[s]
        cached = _cached_keys(
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


def _flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None = None
):
    """torch's fused CPU flash attention with its log-sum-exp: `[B, H, n, D]` (GQA: fewer K/V
    heads) -> out `[B, Hq, n, D]`, lse `[B, Hq, n]` fp32; causal is aligned top-left; `mask`
    is additive, in q's dtype, broadcast to `[B, Hq, n, N]` (a row it hides wholly: output 0)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _whole_history_attention(
    q, k, v, k_cache, v_cache, table, n_cached: list[int], scale: float, k_scale=None, v_scale=None
) -> torch.Tensor:
    """One chunk `q [n, Hq, D]`, `k / v [n, Hkv, D]` over each KV head's first `n_cached[h]`
    cached slots (table `[Hkv, W]`) and itself, causally: no mask is materialised. The chunk's
    causal part and the (unmasked) cached part are fused calls merged by their log-sum-exp,
    one cached call per distinct slot count."""
    q4 = q.transpose(0, 1)[None]
    o, lse = _flash_cpu(q4, k.transpose(0, 1)[None], v.transpose(0, 1)[None], True, scale)
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    for n in sorted(set(n_cached)):
        if not n:
            continue
        heads = [h for h in range(hkv) if n_cached[h] == n]
        nb = -(-n // k_cache.shape[1])
        if len(heads) == hkv:
            kc = dequantize(_gather(k_cache, table[None], nb)[:, :, :n], k_scale, 1).to(q.dtype)
            vc = dequantize(_gather(v_cache, table[None], nb)[:, :, :n], v_scale, 1).to(q.dtype)
            oc, lsec = _flash_cpu(q4, kc, vc, False, scale)
            o, _ = merge_states(o, lse, oc, lsec)
            continue
        idx = torch.tensor(heads, device=q.device)
        cols = (idx[:, None] * g + torch.arange(g, device=q.device)[None, :]).reshape(-1)
        sub = table.index_select(0, idx)[None]
        ks = k_scale.index_select(0, idx) if k_scale is not None else None
        vs = v_scale.index_select(0, idx) if v_scale is not None else None
        kc = dequantize(_gather(k_cache, sub, nb)[:, :, :n], ks, 1).to(q.dtype)
        vc = dequantize(_gather(v_cache, sub, nb)[:, :, :n], vs, 1).to(q.dtype)
        oc, lsec = _flash_cpu(q4[:, cols].contiguous(), kc, vc, False, scale)
        merged, merged_lse = merge_states(o[:, cols], lse[:, cols], oc, lsec)
        o[:, cols], lse[:, cols] = merged.to(o.dtype), merged_lse
    return o[0].transpose(0, 1)


def causal_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain causal attention inside each chunk when every head is full and nothing is
    cached (no log-sum-exp needed): torch SDPA, which has fused CPU and GPU kernels."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        # 4-d inputs: 3-d ones take SDPA's unfused math path on CPU (5x slower)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None],
            k[a:b].transpose(0, 1)[None],
            v[a:b].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        out[a:b] = o[0].transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / rms(x))` over the last axis: x `[..., H]`, weight `[H]` in x's dtype.

    Normalised in fp32, rounded to x's dtype, then scaled in that dtype (LlamaRMSNorm).
    """
    if x.dtype == torch.float32 and x.device.type == "cpu":  # torch's op: the same values, fewer launches
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block boundary: `s = x + residual` (in x's dtype), returns
    `(rms_norm(s), s)`; `s` is the residual stream the next block adds to."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half layout) of q `[T, Hq, D]` and k `[T, Hkv, D]` by fp32
    cos / sin `[T, D / 2]` of each token's position; returns new tensors in q's / k's dtype.

    Pair j is (x[j], x[j + D/2]): `(x1 cos - x2 sin, x2 cos + x1 sin)`, computed in fp32.
    """
    c, s = cos[:, None, :], sin[:, None, :]
    return _rotate_half(q, c, s), _rotate_half(k, c, s)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
