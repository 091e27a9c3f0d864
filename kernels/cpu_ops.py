"""The CPU's C++ ops, built on first use: paged decode attention straight from the pool, causal
prefill attention (nothing cached; full heads, or window heads' (sink, recent) mask), few-row fp32 matmuls from a column-block
weight (`linear_columns`, engine/cpu_linear.py), and the fp32 add + RMSNorm, RoPE and SiLU x up
of each layer in one pass each. None has a backward: `serves` refuses inputs that want a gradient.

The torch reference (`reference.paged_decode`) copies each sequence's K and V blocks into a
dense tensor with `index_select` and then runs torch's flash kernel over the copy: every
slot crosses memory three times (read, write, read again). At 16 sequences of 1000 tokens on
the default model the copies were 36% of a decode step (76 of 209 ms, one thread), more than
the attention itself. This op reads each block where it lies: one task per (sequence, KV
head) walks its block-table row, scores the G query heads of that KV head against a block's
slots and folds them into an online softmax (fp32), as
vLLM's CPU paged-attention kernels do.

It serves a cache in the model's dtype (fp32), with the mask `slot < length` while every head's
window still reaches position 0 (full heads, young window heads), and with the (keep, recent)
mask over per-slot positions once a window has moved (blocks nothing sees are skipped); the
reference keeps fp8 scales.

`add_rms_norm` and `rotate_half` replace a chain of ~8 eager ops each (add, pow, mean, rsqrt,
products; float casts, chunks, four products, a concatenation) that cost more in launches than
in arithmetic at decode batch sizes. `g++` builds the module once per machine into torch's
extension cache (~25 s); without a compiler, or with `HEADWISE_CPU_DECODE=torch`, the torch
references run alone.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
import shutil

import torch

log = logging.getLogger(__name__)

# The C++ source, one translation unit from the files of cpu_src/ in this order: the shared
# vector helpers first, then one file per op family, then the Python bindings
_PARTS = ("common.h", "decode.cpp", "prefill.cpp", "linear.cpp", "layer.cpp", "module.cpp")


def _source() -> str:
    folder = importlib.resources.files("headwise.kernels") / "cpu_src"
    return "\n".join((folder / name).read_text() for name in _PARTS)


@functools.cache
def _module():
    """The built op, or None (no compiler, a failed build, or HEADWISE_CPU_DECODE=torch)."""
    if os.environ.get("HEADWISE_CPU_DECODE", "").strip().lower() == "torch":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: the venv's may not be on it
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        # the build uses -march=native: a cache shared by different CPUs gets one build each
        tag = torch.backends.cpu.get_cpu_capability().lower()
        return load_inline(
            f"headwise_cpu_ops_{tag}",
            _source(),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # a build failure must not stop the engine: the reference serves
        log.warning("the CPU paged-decode op did not build (%s); decode attention gathers blocks instead", exc)
        return None


_ABSENT = torch.empty(0, dtype=torch.int32)  # an optional tensor argument not given (the C++ side tests numel)


def available() -> bool:
    return _module() is not None


def serves(*tensors: torch.Tensor) -> bool:
    """Every tensor is an fp32 CPU tensor (the only kind the ops take), the ops are built, and
    no gradient is wanted through them: they have no backward, so a profiler that trains through
    the model (duo's gates) keeps the torch formulas and their autograd.

    fp32 only: a bf16 engine keeps the gathering reference, whose greedy tokens matched fp32
    transformers on 7 of the 10 parity prompts where this decode op's gave 5 (its fp32 sums round
    differently to bf16 at 0.3% of the outputs, by one bf16 ulp: no better or worse, but the
    bf16 parity bar of tests/test_hf_parity.py is set by the reference's rounding)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    pos_cache: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    reach: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.paged_decode`: out `[B, Hq, D]` in q's dtype and lse `[B, Hq]` fp32 (-inf,
    output 0, for a head with no visible slot). Without `pos_cache` every slot below a head's
    length is visible; with it (a moved window), slot n of a head is visible iff n < keep or its
    position (`pos_cache [blocks, block_size]`, a released block's none) > reach `[B, Hkv]`."""
    module = _module()
    assert module is not None
    out, lse = module.paged_decode(
        q.float().contiguous(),
        k_cache,
        v_cache,
        block_tables.to(torch.int32).contiguous(),
        rows.long(),
        lengths.to(torch.int32).contiguous(),
        scale,
        _ABSENT if pos_cache is None else pos_cache.to(torch.int32).contiguous(),
        _ABSENT if keep is None else keep.to(torch.int32).contiguous(),
        _ABSENT if reach is None else reach.long().contiguous(),
    )
    return out.to(q.dtype), lse


COLUMNS = 32  # output columns per block of a `pack_columns` weight


def pack_columns(weight: torch.Tensor) -> torch.Tensor:
    """fp32 `weight [N, K]` (N a multiple of COLUMNS) as `[N / COLUMNS, K, COLUMNS]`, the layout
    `linear_columns` streams."""
    n, k = weight.shape
    return weight.detach().reshape(n // COLUMNS, COLUMNS, k).transpose(1, 2).contiguous()


def linear_columns(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ W^T` for fp32 `x` from `pack_columns(W)`: for few rows (decode batches)."""
    module = _module()
    assert module is not None
    return module.linear_columns(x.contiguous(), packed)


def causal_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sink: torch.Tensor | None = None,
    recent: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference_cpu.causal_prefill` for fp32 `q [T, Hq, D]`, `k / v [T, Hkv, D]` with D 64 or
    128 (contiguous within a head): causal attention inside each sequence of `cu_seqlens`,
    whose tokens are at positions 0, 1, ... With `sink / recent [S, Hkv]` (recent >= 1), the
    mask of `reference.sink_window_prefill` instead: key j is visible to query i iff j <= i
    and (j < sink or j > i - recent); key blocks no query of a tile sees are not read."""
    module = _module()
    assert module is not None
    return module.causal_prefill(
        q,
        k,
        v,
        cu_seqlens.tolist(),
        scale,
        _ABSENT if sink is None else sink.to(torch.int32).contiguous(),
        _ABSENT if recent is None else recent.clamp(max=2**30).to(torch.int32).contiguous(),
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of fp32 CPU `x = [gate | up]` `[T, 2I]` -> `[T, I]`."""
    module = _module()
    assert module is not None
    return module.silu_and_mul(x.contiguous())


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_layer.add_rms_norm` for fp32 CPU tensors: (rms_norm(x + residual), x + residual)."""
    module = _module()
    assert module is not None
    out, total = module.add_rms_norm(x.contiguous(), residual.contiguous(), weight.contiguous(), eps)
    return out, total


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of fp32 `x [T, H, D]` by fp32 cos / sin `[T, D / 2]` (`reference_layer.apply_rotary`)."""
    module = _module()
    assert module is not None
    return module.rotate_half(x, cos.contiguous(), sin.contiguous())
