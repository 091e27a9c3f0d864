"""Paged prefix attention for chunked prefill: chunk queries against their cached slots.

A program takes TOKENS consecutive query tokens x one KV head; its rows are the
(token, query head of the group) pairs, so each cached K/V tile is loaded once for the
whole GQA group and the chunk tile. Tokens may belong to any sequences in any order
(`q_seq` per token): the program walks the distinct sequences present in its tile, which
is one for a contiguous chunk, without a host sync; its block-table row is `rows[seq]`.
A bounded head caches about sink + recent (+ select) slots (whole blocks), so its cost is
O(chunk x capacity) by construction. An fp8 cache is widened to the query's dtype tile by
tile; the head's K scale multiplies its scores and its V scale the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.triton_common import LOG2E, dot_f32, dot_flags, finish_softmax, next_pow2, online_softmax_step

ROWS = 64  # query rows (tokens x padded group) per program: a full tensor-core M tile
TILE_KEYS = 64  # halved for fp32 so K/V stages stay under 100 KiB of shared memory
_NO_SEQ = 2**31 - 1


@triton.jit
def _paged_prefix_kernel(
    q_ptr,
    qpos_ptr,
    qseq_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    table_ptr,
    rows_ptr,
    len_ptr,
    keep_ptr,
    recent_ptr,
    ks_ptr,
    vs_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,
    num_tokens,
    s_qt,
    s_qh,
    s_kb,
    s_ks,
    s_vb,
    s_vs,
    s_pb,
    s_ps,
    s_tb,
    s_th,
    s_lb,
    s_lh,
    s_keb,
    s_keh,
    s_rb,
    s_rh,
    s_ot,
    s_oh,
    s_et,
    s_eh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    TOKENS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    TILE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    NO_SEQ: tl.constexpr,
    SCALED: tl.constexpr,
):
    h = tl.program_id(1)
    score_scale = qk_scale
    if SCALED:  # fp8 cache: K's scale folds into the score scale, V's into the output
        score_scale = qk_scale * tl.load(ks_ptr + h)
    rows = tl.arange(0, TOKENS * G_PAD)
    t = (tl.program_id(0) * TOKENS + rows // G_PAD).to(tl.int64)
    hq = h * G + rows % G_PAD
    row_ok = (t < num_tokens) & (rows % G_PAD < G)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    seq = tl.load(qseq_ptr + t, mask=row_ok, other=NO_SEQ).to(tl.int32)
    qpos = tl.load(qpos_ptr + t, mask=row_ok, other=0)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + t[:, None] * s_qt + hq[:, None] * s_qh + d[None, :], mask=q_mask, other=0.0)
    n = tl.arange(0, TILE)
    cur = tl.min(seq, 0)
    while cur != NO_SEQ:
        mine = seq == cur
        length = tl.load(len_ptr + cur * s_lb + h * s_lh)
        keep = tl.load(keep_ptr + cur * s_keb + h * s_keh)
        recent = tl.load(recent_ptr + cur * s_rb + h * s_rh)
        horizon = qpos - recent  # slot visible iff it is a kept slot or its position > horizon
        table = table_ptr + tl.load(rows_ptr + cur).to(tl.int64) * s_tb + h * s_th
        m = tl.full([TOKENS * G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([TOKENS * G_PAD], tl.float32)
        acc = tl.zeros([TOKENS * G_PAD, D_PAD], tl.float32)
        for r0 in range(0, length, TILE):
            r = r0 + n
            ok = r < length
            blk = tl.load(table + r // BS, mask=ok, other=0).to(tl.int64)
            slot = r % BS
            kpos = tl.load(pos_ptr + blk * s_pb + slot * s_ps, mask=ok, other=0)
            kv_mask = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + blk[:, None] * s_kb + slot[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
            s = dot_f32(q, tl.trans(k.to(q.dtype)), UPCAST, IEEE) * score_scale
            visible = ok[None, :] & ((r < keep)[None, :] | (kpos[None, :] > horizon[:, None]))
            s = tl.where(visible & mine[:, None], s, float("-inf"))
            v = tl.load(v_ptr + blk[:, None] * s_vb + slot[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
            m, l, acc = online_softmax_step(m, l, acc, s, v.to(q.dtype), UPCAST, IEEE)
        out, lse = finish_softmax(m, l, acc)
        if SCALED:
            out = out * tl.load(vs_ptr + h)
        store = mine & row_ok
        tl.store(
            o_ptr + t[:, None] * s_ot + hq[:, None] * s_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=store[:, None] & d_ok[None, :],
        )
        tl.store(lse_ptr + t * s_et + hq * s_eh, lse, mask=store)
        cur = tl.min(tl.where(seq > cur, seq, NO_SEQ), 0)


def launch_prefix(
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
    """Checked inputs in, (out [T, Hq, D], lse [T, Hq]) out; see triton_ops.paged_prefix."""
    t, hq, d = q.shape
    hkv = block_tables.shape[1]
    g = hq // hkv
    g_pad = next_pow2(g)
    out = torch.empty_like(q)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    if t == 0 or hq == 0:
        return out, lse
    tokens = max(1, ROWS // g_pad)
    tile = TILE_KEYS if q.element_size() <= 2 else TILE_KEYS // 2
    upcast, ieee = dot_flags(q.dtype)  # an fp8 cache is widened to q's dtype before each dot
    _paged_prefix_kernel[(triton.cdiv(t, tokens), hkv)](
        q,
        q_pos,
        q_seq,
        k_cache,
        v_cache,
        pos_cache,
        block_tables,
        rows,
        lengths,
        keep,
        recent,
        k_scale if k_scale is not None else lengths,  # not read unless SCALED
        v_scale if v_scale is not None else lengths,
        out,
        lse,
        scale * LOG2E,
        t,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        pos_cache.stride(0),
        pos_cache.stride(1),
        block_tables.stride(0),
        block_tables.stride(1),
        lengths.stride(0),
        lengths.stride(1),
        keep.stride(0),
        keep.stride(1),
        recent.stride(0),
        recent.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        G=g,
        G_PAD=g_pad,
        TOKENS=tokens,
        D=d,
        D_PAD=next_pow2(d, 16),
        BS=k_cache.shape[1],
        TILE=tile,
        UPCAST=upcast,
        IEEE=ieee,
        NO_SEQ=_NO_SEQ,
        SCALED=k_scale is not None,
        num_warps=4,
        num_stages=3,
    )
    return out, lse
