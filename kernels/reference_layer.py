"""The per-layer model ops' torch references (kernels/reference.py's contract): RMSNorm, RMSNorm
with the residual add, the gated MLP's SiLU x up, RoPE; exactly what the unfused model computes: normalisation in fp32
like Hugging Face's LlamaRMSNorm, rotation in fp32 from fp32 cos / sin."""

from __future__ import annotations

import torch

from headwise.kernels import cpu_ops


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
    if cpu_ops.serves(x, residual, weight):
        return cpu_ops.add_rms_norm(x, residual, weight, eps)
    s = x + residual
    return rms_norm(s, weight, eps), s


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: `silu(gate) * up` of `x = [gate | up]` `[T, 2I]` -> `[T, I]`."""
    if x.dim() == 2 and cpu_ops.serves(x):
        return cpu_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half layout) of q `[T, Hq, D]` and k `[T, Hkv, D]` by fp32
    cos / sin `[T, D / 2]` of each token's position; returns new tensors in q's / k's dtype.

    Pair j is (x[j], x[j + D/2]): `(x1 cos - x2 sin, x2 cos + x1 sin)`, computed in fp32.
    """
    if cpu_ops.serves(q, k, cos, sin):
        return cpu_ops.rotate_half(q, cos, sin), cpu_ops.rotate_half(k, cos, sin)
    c, s = cos[:, None, :], sin[:, None, :]
    return _rotate_half(q, c, s), _rotate_half(k, c, s)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
