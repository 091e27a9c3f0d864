"""RoPE of q and k in one launch: one program per token rotates all of its query and KV heads.

cos / sin `[T, D / 2]` (fp32, gathered once per forward from the model's table) are read
once per token for every head. Pair j is (x[j], x[j + D/2]) (the rotate-half layout of
Llama checkpoints). q and k may be strided views of the fused qkv projection; the outputs
are new contiguous tensors. Launched without FMA contraction, so each product is rounded
before the sum as in the torch reference: fp32 results are bit-identical to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.triton_common import next_pow2


@triton.jit
def _rotate_heads(x_row, o_row, s_h, s_oh, num_heads, c, s, j, j_ok, HALF: tl.constexpr, H_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)
    mask = (h < num_heads)[:, None] & j_ok[None, :]
    lo = h[:, None] * s_h + j[None, :]
    x1 = tl.load(x_row + lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + lo + HALF, mask=mask, other=0.0).to(tl.float32)
    out = h[:, None] * s_oh + j[None, :]
    tl.store(o_row + out, (x1 * c[None, :] - x2 * s[None, :]).to(o_row.dtype.element_ty), mask=mask)
    tl.store(o_row + out + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(o_row.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    num_q_heads,
    num_kv_heads,
    s_qt,
    s_qh,
    s_kt,
    s_kh,
    s_ct,
    s_st,
    s_qot,
    s_qoh,
    s_kot,
    s_koh,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    c = tl.load(cos_ptr + t * s_ct + j, mask=j_ok, other=0.0)
    s = tl.load(sin_ptr + t * s_st + j, mask=j_ok, other=0.0)
    _rotate_heads(q_ptr + t * s_qt, qo_ptr + t * s_qot, s_qh, s_qoh, num_q_heads, c, s, j, j_ok, HALF, HQ_PAD)
    _rotate_heads(k_ptr + t * s_kt, ko_ptr + t * s_kot, s_kh, s_koh, num_kv_heads, c, s, j, j_ok, HALF, HKV_PAD)


def launch_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs in (unit stride along D and along cos / sin rows); see triton_ops.apply_rotary."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0 or d == 0:
        return qo, ko
    half = d // 2
    _rope_kernel[(t,)](
        q,
        k,
        cos,
        sin,
        qo,
        ko,
        hq,
        hkv,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        qo.stride(0),
        qo.stride(1),
        ko.stride(0),
        ko.stride(1),
        HALF=half,
        HALF_PAD=next_pow2(half),
        HQ_PAD=next_pow2(hq),
        HKV_PAD=next_pow2(hkv),
        num_warps=4,
        enable_fp_fusion=False,
    )
    return qo, ko
