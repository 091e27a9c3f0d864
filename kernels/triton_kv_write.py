"""KV write: scatter new K/V rows (and their positions) to per-head cache slots.

One program per token writes all of its KV heads: each head's row goes to the flat slot
`slot_mapping[t, h]` (block = slot // block_size); -1 drops the row. A recent ring is
expressed entirely by the slot mapping, so the kernel knows nothing about budgets. An fp8
cache stores `x / scale` of the row's KV head, clamped to the format (kernels/kv_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.triton_common import next_pow2


@triton.jit
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    pos_ptr,
    slot_ptr,
    kc_ptr,
    vc_ptr,
    pc_ptr,
    ks_ptr,
    vs_ptr,
    num_kv_heads,
    s_kt,
    s_kh,
    s_vt,
    s_vh,
    s_st,
    s_sh,
    s_kcb,
    s_kcs,
    s_vcb,
    s_vcs,
    s_pcb,
    s_pcs,
    H_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BS: tl.constexpr,
    SCALED: tl.constexpr,
    FMAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    slot = tl.load(slot_ptr + t * s_st + h * s_sh, mask=h < num_kv_heads, other=-1).to(tl.int64)
    ok = slot >= 0
    blk = slot // BS
    off = slot % BS
    mask = ok[:, None] & (d < D)[None, :]
    k = tl.load(k_ptr + t * s_kt + h[:, None] * s_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], mask=mask)
    if SCALED:  # fp8 cache: x / scale of the head, saturated at the format's max
        ks = tl.load(ks_ptr + h, mask=h < num_kv_heads, other=1.0)
        vs = tl.load(vs_ptr + h, mask=h < num_kv_heads, other=1.0)
        k = tl.clamp(k.to(tl.float32) / ks[:, None], -FMAX, FMAX)
        v = tl.clamp(v.to(tl.float32) / vs[:, None], -FMAX, FMAX)
    tl.store(kc_ptr + (blk * s_kcb + off * s_kcs)[:, None] + d[None, :], k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + (blk * s_vcb + off * s_vcs)[:, None] + d[None, :], v.to(vc_ptr.dtype.element_ty), mask=mask)
    pos = tl.load(pos_ptr + t) + tl.zeros([H_PAD], tl.int64)  # one position for all heads of the token
    tl.store(pc_ptr + blk * s_pcb + off * s_pcs, pos.to(pc_ptr.dtype.element_ty), mask=ok)


def launch_kv_write(
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
    """Checked inputs in; see triton_ops.kv_write."""
    t, hkv, d = k.shape
    if t == 0 or hkv == 0:
        return
    _kv_write_kernel[(t,)](
        k,
        v,
        positions,
        slot_mapping,
        k_cache,
        v_cache,
        pos_cache,
        k_scale if k_scale is not None else positions,  # not read unless SCALED
        v_scale if v_scale is not None else positions,
        hkv,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        slot_mapping.stride(0),
        slot_mapping.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        pos_cache.stride(0),
        pos_cache.stride(1),
        H_PAD=next_pow2(hkv),
        D=d,
        D_PAD=next_pow2(d),
        BS=k_cache.shape[1],
        SCALED=k_scale is not None,
        FMAX=torch.finfo(k_cache.dtype).max if k_scale is not None else 0.0,
        num_warps=4,
    )
