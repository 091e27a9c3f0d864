"""Causal in-chunk attention with a per-(sequence, KV head) sink + window mask.

A program takes TOKENS consecutive query tokens x one KV head (rows = token x query head
of the group, so K/V tiles are shared by the GQA group). It visits only key rows that can
be visible: the sink rows at the start of the sequence and the rows from
`first query - recent + 1` up to the last query. Everything else is fully masked and
never loaded, so a window head costs O(T x (sink + window)) and a full head O(T^2 / 2).

Row ranges are derived from positions, which must increase strictly inside a sequence
(a prefill chunk is a run of consecutive positions): then key row j < i has
pos[j] <= pos[i] - (i - j), so rows further back than `recent` are out of the window and
rows past the sink count are not sinks. The exact position mask is still applied per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.triton_common import LOG2E, dot_f32, dot_flags, finish_softmax, next_pow2, online_softmax_step

ROWS = 64  # query rows (tokens x padded group) per program
TILE_KEYS = 64  # halved for fp32 so K/V stages stay under 100 KiB of shared memory


@triton.jit
def _key_range(
    m,
    l,
    acc,
    q,
    qpos,
    mine,
    row_sink,
    horizon,
    k_ptr,
    v_ptr,
    pos_ptr,
    j_lo,
    j_hi,
    qk_scale,
    s_kt,
    s_vt,
    d,
    d_ok,
    TILE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Fold key rows [j_lo, j_hi) of one KV head into the state of the query rows."""
    n = tl.arange(0, TILE)
    for j0 in range(j_lo, j_hi, TILE):
        j = (j0 + n).to(tl.int64)
        ok = j < j_hi
        kpos = tl.load(pos_ptr + j, mask=ok, other=0)
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + j[:, None] * s_kt + d[None, :], mask=kv_mask, other=0.0)
        s = dot_f32(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        visible = (
            ok[None, :]
            & mine[:, None]
            & (kpos[None, :] <= qpos[:, None])
            & ((kpos[None, :] < row_sink) | (kpos[None, :] > horizon[:, None]))
        )
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_ptr + j[:, None] * s_vt + d[None, :], mask=kv_mask, other=0.0)
        m, l, acc = online_softmax_step(m, l, acc, s, v, UPCAST, IEEE)
    return m, l, acc


@triton.jit
def _sink_window_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cu_ptr,
    seq_ptr,
    sink_ptr,
    recent_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,
    num_tokens,
    s_qt,
    s_qh,
    s_kt,
    s_kh,
    s_vt,
    s_vh,
    s_sb,
    s_sh,
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
    TILE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    h = tl.program_id(1)
    t_first = tl.program_id(0) * TOKENS
    t_last = tl.minimum(t_first + TOKENS, num_tokens) - 1
    rows = tl.arange(0, TOKENS * G_PAD)
    t = (t_first + rows // G_PAD).to(tl.int64)
    hq = h * G + rows % G_PAD
    row_ok = (t <= t_last) & (rows % G_PAD < G)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + t[:, None] * s_qt + hq[:, None] * s_qh + d[None, :], mask=q_mask, other=0.0)
    qpos = tl.load(pos_ptr + t, mask=row_ok, other=0)
    k_head = k_ptr + h * s_kh
    v_head = v_ptr + h * s_vh
    for s in range(tl.load(seq_ptr + t_first), tl.load(seq_ptr + t_last) + 1):
        a = tl.load(cu_ptr + s).to(tl.int32)
        b = tl.load(cu_ptr + s + 1).to(tl.int32)
        r_lo = tl.maximum(t_first, a)
        r_hi = tl.minimum(t_last + 1, b)  # exclusive
        if r_lo < r_hi:
            sink = tl.load(sink_ptr + s * s_sb + h * s_sh)
            recent = tl.load(recent_ptr + s * s_rb + h * s_rh)
            mine = row_ok & (t >= a) & (t < b)
            horizon = qpos - recent
            first_pos = tl.load(pos_ptr + a).to(tl.int32)
            win_lo = tl.maximum(a, r_lo - recent + 1)
            sink_hi = tl.minimum(a + tl.maximum(sink - first_pos, 0), win_lo)
            m = tl.full([TOKENS * G_PAD], float("-inf"), tl.float32)
            l = tl.zeros([TOKENS * G_PAD], tl.float32)
            acc = tl.zeros([TOKENS * G_PAD, D_PAD], tl.float32)
            m, l, acc = _key_range(
                m,
                l,
                acc,
                q,
                qpos,
                mine,
                sink,
                horizon,
                k_head,
                v_head,
                pos_ptr,
                a,
                sink_hi,
                qk_scale,
                s_kt,
                s_vt,
                d,
                d_ok,
                TILE,
                UPCAST,
                IEEE,
            )
            m, l, acc = _key_range(
                m,
                l,
                acc,
                q,
                qpos,
                mine,
                sink,
                horizon,
                k_head,
                v_head,
                pos_ptr,
                win_lo,
                r_hi,
                qk_scale,
                s_kt,
                s_vt,
                d,
                d_ok,
                TILE,
                UPCAST,
                IEEE,
            )
            out, lse = finish_softmax(m, l, acc)
            tl.store(
                o_ptr + t[:, None] * s_ot + hq[:, None] * s_oh + d[None, :],
                out.to(o_ptr.dtype.element_ty),
                mask=mine[:, None] & d_ok[None, :],
            )
            tl.store(lse_ptr + t * s_et + hq * s_eh, lse, mask=mine)


def launch_sink_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sink: torch.Tensor,
    recent: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs in, (out [T, Hq, D], lse [T, Hq]) out; see triton_ops.sink_window_prefill."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    g_pad = next_pow2(g)
    # rows outside every sequence are left unwritten, as in the reference
    out = torch.empty_like(q)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens.shape[0] - 1
    if t == 0 or hq == 0 or num_seqs == 0:
        return out, lse
    # sequence of every row, found on the device so that no lengths come back to the host
    rows = torch.arange(t, device=q.device, dtype=cu_seqlens.dtype)
    seq_of_row = torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True, out_int32=True)
    seq_of_row.clamp_(max=num_seqs - 1)
    tokens = max(1, ROWS // g_pad)
    tile = TILE_KEYS if q.element_size() <= 2 else TILE_KEYS // 2
    upcast, ieee = dot_flags(k.dtype)
    _sink_window_kernel[(triton.cdiv(t, tokens), hkv)](
        q,
        k,
        v,
        positions,
        cu_seqlens,
        seq_of_row,
        sink,
        recent,
        out,
        lse,
        scale * LOG2E,
        t,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        sink.stride(0),
        sink.stride(1),
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
        TILE=tile,
        UPCAST=upcast,
        IEEE=ieee,
        num_warps=4,
        num_stages=2,
    )
    return out, lse
