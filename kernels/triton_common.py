"""Pieces shared by the Triton attention kernels: online softmax in base 2, input checks.

Scores are kept in log2 units (`q.k * scale * log2(e)`) so every exponential is an
`exp2`, which maps to one MUFU instruction; lse values leave the kernels in natural log.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)
# constexpr copies: jitted code may read module globals only when they are constexpr
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(math.log(2.0))
INTERPRET = bool(triton.knobs.runtime.interpret)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def dot_f32(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32-accumulated `a @ b`.

    UPCAST: only under the interpreter, which multiplies bf16 operands as their raw uint16
    bits; on a GPU bf16/fp16 go to the tensor cores as they are.
    IEEE: fp32 operands use full-precision FMA instead of TF32 so fp32 matches the reference.
    """
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def online_softmax_step(m, l, acc, s, v, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Fold one key tile into a running (max, sum, acc) state.

    s `[M, N]` log2-unit scores with -inf where masked, v `[N, D]`. Rows that have seen no
    visible key keep m = -inf, l = 0, acc = 0 (the `m_safe` guard avoids -inf - -inf).
    """
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    # p is rounded to the cache dtype so P@V runs on the tensor cores, as flash-attention does
    acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, UPCAST, IEEE)
    return m_new, l, acc


@triton.jit
def finish_softmax(m, l, acc):
    """Normalised output and natural-log lse; an empty row gives 0 and -inf."""
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(l_safe)) * LN2_C)
    return out, lse


def next_pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def dot_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(UPCAST, IEEE) constexprs of `dot_f32` for operands of `dtype`."""
    return INTERPRET and dtype == torch.bfloat16, dtype == torch.float32


def require(cond: bool, message: str) -> None:
    """Raise ValueError(message) unless cond: the user-facing input check of every op."""
    if not cond:
        raise ValueError(message)


def check_attention_dtype(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    require(t.dtype in DTYPES, f"{name}.dtype={t.dtype}: expected float16, bfloat16 or float32")
    if like is not None:
        require(t.dtype == like.dtype, f"{name}.dtype={t.dtype} differs from the query dtype {like.dtype}")


def check_cache(name: str, cache: torch.Tensor, head_dim: int) -> None:
    """Caches are written in place, so they cannot be made contiguous here."""
    require(cache.dim() == 3, f"{name} must be [num_blocks, block_size, head_dim], got {tuple(cache.shape)}")
    require(cache.shape[2] == head_dim, f"{name} head_dim {cache.shape[2]} != query head_dim {head_dim}")
    require(cache.stride(2) == 1, f"{name} must be contiguous in head_dim (stride {cache.stride(2)})")


def check_int(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    require(not t.is_floating_point() and t.dtype != torch.bool, f"{name}.dtype={t.dtype}: expected an integer tensor")
    require(tuple(t.shape) == shape, f"{name} shape {tuple(t.shape)}: expected {shape}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        require(dev == first, f"{name} is on {dev}, expected {first} like the other inputs")
