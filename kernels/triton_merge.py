"""Merge of two partial softmax states over disjoint key sets, by log-sum-exp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.triton_common import LN2_C, LOG2E_C, next_pow2

ROWS = 16  # rows of [D] per program


@triton.jit
def _merge_kernel(
    o1_ptr,
    l1_ptr,
    o2_ptr,
    l2_ptr,
    out_ptr,
    lse_ptr,
    num_rows,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    d = tl.arange(0, D_PAD)
    r_ok = r < num_rows
    mask = r_ok[:, None] & (d < D)[None, :]
    x1 = tl.load(l1_ptr + r, mask=r_ok, other=float("-inf")) * LOG2E_C
    x2 = tl.load(l2_ptr + r, mask=r_ok, other=float("-inf")) * LOG2E_C
    m = tl.maximum(x1, x2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp2(x1 - m_safe)
    w2 = tl.exp2(x2 - m_safe)
    total = w1 + w2
    # both states empty: total = 0, output 0 and lse -inf, as in the reference
    total_safe = tl.where(total == 0.0, 1.0, total)
    o1 = tl.load(o1_ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + r[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (o1 * (w1 / total_safe)[:, None] + o2 * (w2 / total_safe)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r[:, None] * D + d[None, :], out, mask=mask)
    lse = tl.where(total == 0.0, float("-inf"), (m_safe + tl.log2(total_safe)) * LN2_C)
    tl.store(lse_ptr + r, lse, mask=r_ok)


def launch_merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs in; see triton_ops.merge_states."""
    d = o1.shape[-1]
    o1c, o2c = o1.contiguous(), o2.contiguous()
    l1c, l2c = lse1.float().contiguous(), lse2.float().contiguous()
    out = torch.empty_like(o1c)
    lse = torch.empty_like(l1c)
    rows = l1c.numel()
    if rows and d:
        _merge_kernel[(triton.cdiv(rows, ROWS),)](
            o1c, l1c, o2c, l2c, out, lse, rows, ROWS=ROWS, D=d, D_PAD=next_pow2(d), num_warps=4
        )
    return out, lse
