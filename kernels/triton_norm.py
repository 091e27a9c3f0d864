"""RMSNorm, optionally fused with the residual add before it: one program per row.

The pre-norm block boundary `s = x + residual; y = rms_norm(s)` is one read of x and
residual and one write of y and s, instead of the eight unfused elementwise kernels.
Rounding follows the reference: the sum in the activation dtype, the normalisation in
fp32, rounded to the activation dtype, then scaled by the weight in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.triton_common import next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    s_ptr,
    n_cols,
    eps,
    s_x,
    s_r,
    s_y,
    s_s,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * s_r + cols, mask=ok, other=0.0)
        # rounded to the activation dtype before it is normalised, as `x + residual` is
        x = (x.to(tl.float32) + r.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(s_ptr + row * s_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * inv_rms).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    # the product of two 16-bit floats is exact in fp32, so this rounds once like `weight * y`
    y = (y.to(tl.float32) * w.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * s_y + cols, y, mask=ok)


def launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checked inputs in (`[rows, H]` views with a unit last stride); returns (y, x + residual)."""
    rows, h = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else None
    if rows == 0 or h == 0:
        return y, s
    block = next_pow2(h)
    r = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](
        x,
        r,
        weight,
        y,
        s if s is not None else y,
        h,
        float(eps),
        x.stride(0),
        r.stride(0),
        y.stride(0),
        y.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(4, block // 512)),
    )
    return y, s
