"""Split-K paged decode (flash-decoding) over head-granular block tables.

One program per (sequence, KV head, split) serves the whole GQA group: each K/V tile is
loaded once and multiplied against all G query heads with `tl.dot` (rows padded to 16),
never once per query head (vLLM issue #15351). Splits are a fixed number of tokens, so
the split count follows each head's own length: a 32k full head fans out over many
programs while a 320-token window head takes one, and every SM stays busy. A reduce
kernel merges the partial states of a head by log-sum-exp.

The grid is sized from shapes known on the host (batch, heads, block-table width), never
from `lengths`, so a decode step costs no device-to-host sync and can be captured in a
CUDA graph; programs past the end of their head's length exit at once.

Block tables are the engine's persistent per-layer tables `[R, Hkv, W]`; `rows[b]` names
sequence b's row. Bounded heads apply the (keep, recent) position mask: a window head's
table starts with its sink blocks and then the blocks of its window, whose oldest block
may still hold positions that left the window. Full heads (recent >= UNBOUNDED) skip the
position loads. An fp8 cache is widened to the query's dtype tile by tile; the head's K
scale multiplies its scores and its V scale the output (kernels/kv_quant.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from headwise.kernels.layout import UNBOUNDED
from headwise.kernels.triton_common import (
    LOG2E,
    LOG2E_C,
    dot_f32,
    dot_flags,
    finish_softmax,
    next_pow2,
    online_softmax_step,
)

TILE_TOKENS = 64  # keys per loop iteration: 32 KiB of bf16 K+V at head_dim 128
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, partial store) dominates
PROGRAMS_PER_SM = 8  # target grid when every head is full: a few waves, small tail
REDUCE_TILE = 16  # partial states merged per reduce iteration


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so tests exercise several splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(batch: int, kv_heads: int, table_tokens: int, device: torch.device) -> tuple[int, int]:
    """(tokens_per_split, max_splits) for a decode launch, from host-known shapes only.

    `table_tokens` (block-table width x block size) bounds every head's length. A head of
    length n uses ceil(n / tokens_per_split) splits; tokens_per_split is a multiple of
    TILE_TOKENS so split boundaries fall on tile boundaries. Splits are sized for the
    table width, so callers should pass tables trimmed to the batch's longest head (known
    on the host), not padded to the model's maximum length.
    """
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), max(1, batch * kv_heads))
    cap = triton.cdiv(max(1, table_tokens), MIN_SPLIT_TOKENS)
    max_splits = max(1, min(want, cap))
    per_split = triton.cdiv(triton.cdiv(max(1, table_tokens), max_splits), TILE_TOKENS) * TILE_TOKENS
    return per_split, triton.cdiv(max(1, table_tokens), per_split)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    table_ptr,
    rows_ptr,
    len_ptr,
    keep_ptr,
    recent_ptr,
    qpos_ptr,
    ks_ptr,
    vs_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,
    split_tokens,
    num_kv_heads,
    s_qb,
    s_qh,
    s_kb,
    s_ks,
    s_vb,
    s_vs,
    s_pb,
    s_tb,
    s_th,
    s_lb,
    s_lh,
    s_keb,
    s_keh,
    s_rb,
    s_rh,
    s_ob,
    s_oh,
    s_os,
    s_og,
    s_eb,
    s_eh,
    s_es,
    s_eg,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    TILE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    UNBOUNDED: tl.constexpr,
    SCALED: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    length = tl.load(len_ptr + b * s_lb + h * s_lh)
    start = split * split_tokens
    # split 0 always writes, so an empty head still yields out 0 / lse -inf
    if (split > 0) & (start >= length):
        return
    end = tl.minimum(start + split_tokens, length)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < G
    d_ok = d < D
    q = tl.load(
        q_ptr + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    row = tl.load(rows_ptr + b).to(tl.int64)
    table = table_ptr + row * s_tb + h * s_th
    keep = tl.load(keep_ptr + b * s_keb + h * s_keh)
    recent = tl.load(recent_ptr + b * s_rb + h * s_rh)
    horizon = tl.load(qpos_ptr + b) - recent  # a slot past `keep` is visible iff its position > horizon
    bounded = recent < UNBOUNDED
    score_scale = qk_scale
    if SCALED:  # fp8 cache: K's scale folds into the score scale, V's into the output
        score_scale = qk_scale * tl.load(ks_ptr + h)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    n = tl.arange(0, TILE)
    for t0 in range(start, end, TILE):
        tok = t0 + n
        ok = tok < end
        # block ids repeat BS times in this gather; the repeats hit L1
        blk = tl.load(table + tok // BS, mask=ok, other=0).to(tl.int64)
        slot = tok % BS
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk[:, None] * s_kb + slot[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
        s = dot_f32(q, tl.trans(k.to(q.dtype)), UPCAST, IEEE) * score_scale
        visible = ok
        if bounded:
            kpos = tl.load(pos_ptr + blk * s_pb + slot, mask=ok, other=0)
            visible = ok & ((tok < keep) | (kpos > horizon))
        s = tl.where(visible[None, :], s, float("-inf"))
        v = tl.load(v_ptr + blk[:, None] * s_vb + slot[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
        m, l, acc = online_softmax_step(m, l, acc, s, v.to(q.dtype), UPCAST, IEEE)
    out, lse = finish_softmax(m, l, acc)
    if SCALED:
        out = out * tl.load(vs_ptr + h)
    o_row = o_ptr + b * s_ob + h * s_oh + split * s_os + g * s_og
    tl.store(o_row[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * s_eb + h * s_eh + split * s_es + g * s_eg, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    po_ptr,
    plse_ptr,
    len_ptr,
    out_ptr,
    lse_ptr,
    split_tokens,
    num_q_heads,
    s_pob,
    s_poh,
    s_pos,
    s_pog,
    s_peb,
    s_peh,
    s_pes,
    s_peg,
    s_lb,
    s_lh,
    s_outb,
    s_outh,
    s_lseb,
    s_lseh,
    G: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_q_heads
    hq = pid % num_q_heads
    h = hq // G
    g = hq % G
    length = tl.load(len_ptr + b * s_lb + h * s_lh)
    splits = tl.maximum(tl.cdiv(length, split_tokens), 1)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    po = po_ptr + b * s_pob + h * s_poh + g * s_pog
    pe = plse_ptr + b * s_peb + h * s_peh + g * s_peg
    # one pass, rescaling like the attention loop: each partial output is read once
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, D_PAD], tl.float32)
    r = tl.arange(0, TILE)
    for s0 in range(0, splits, TILE):
        sp = s0 + r
        ok = sp < splits
        x = tl.load(pe + sp * s_pes, mask=ok, other=float("-inf")) * LOG2E_C
        o = tl.load(po + sp[:, None] * s_pos + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(x[None, :] - m_safe[:, None])  # [1, TILE]
        l = l * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o[None, :, :], 1)
        m = m_new
    out, lse = finish_softmax(m, l, acc)
    tl.store(out_ptr + b * s_outb + hq * s_outh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=d_ok[None, :])
    tl.store(lse_ptr + b * s_lseb + hq * s_lseh + tl.arange(0, 1), lse)


def launch_decode(
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
    """Checked inputs in, (out [B, Hq, D], lse [B, Hq]) out; see triton_ops.paged_decode."""
    b, hq, d = q.shape
    hkv = block_tables.shape[1]
    g = hq // hkv
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    if b == 0 or hq == 0:
        return out, lse
    per_split, max_splits = plan_splits(b, hkv, block_tables.shape[2] * bs, q.device)
    upcast, ieee = dot_flags(q.dtype)  # an fp8 cache is widened to q's dtype before each dot
    consts = dict(
        G=g,
        G_PAD=next_pow2(g, 16),
        D=d,
        D_PAD=next_pow2(d, 16),
        BS=bs,
        TILE=TILE_TOKENS,
        UPCAST=upcast,
        IEEE=ieee,
        UNBOUNDED=UNBOUNDED,
        SCALED=k_scale is not None,
        num_warps=4,
        num_stages=3,
    )
    if max_splits == 1:
        # one split per head: write the final state directly and skip the reduce launch
        po, plse = out, lse
        o_strides: tuple[int, ...] = (out.stride(0), g * out.stride(1), 0, out.stride(1))
        e_strides: tuple[int, ...] = (lse.stride(0), g * lse.stride(1), 0, lse.stride(1))
    else:
        po = torch.empty(b, hkv, max_splits, g, d, dtype=torch.float32, device=q.device)
        plse = torch.empty(b, hkv, max_splits, g, dtype=torch.float32, device=q.device)
        o_strides = po.stride()[:4]
        e_strides = plse.stride()
    _decode_split_kernel[(b * hkv, max_splits)](
        q,
        k_cache,
        v_cache,
        pos_cache,
        block_tables,
        rows,
        lengths,
        keep,
        recent,
        q_pos,
        k_scale if k_scale is not None else lengths,  # not read unless SCALED
        v_scale if v_scale is not None else lengths,
        po,
        plse,
        scale * LOG2E,
        per_split,
        hkv,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        pos_cache.stride(0),
        block_tables.stride(0),
        block_tables.stride(1),
        lengths.stride(0),
        lengths.stride(1),
        keep.stride(0),
        keep.stride(1),
        recent.stride(0),
        recent.stride(1),
        *o_strides,
        *e_strides,
        **consts,
    )
    if max_splits > 1:
        _decode_reduce_kernel[(b * hq,)](
            po,
            plse,
            lengths,
            out,
            lse,
            per_split,
            hq,
            *po.stride()[:4],
            *plse.stride(),
            lengths.stride(0),
            lengths.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            lse.stride(1),
            G=g,
            D=d,
            D_PAD=next_pow2(d, 16),
            TILE=REDUCE_TILE,
            num_warps=4,
        )
    return out, lse
