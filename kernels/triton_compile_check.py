"""Compile every Triton kernel for a CUDA target on a machine without a GPU.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects (globals
that are not constexpr, loop-carried type changes, ...). This drives the public ops with
CPU tensors, intercepts each launch, and compiles it to a cubin with `triton.compile`
for the requested architecture, with the same divisibility hints the JIT would derive.
Nothing is launched. Usage: `python -m headwise.kernels.triton_compile_check --arch 90`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET; the interpreter compiles nothing")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from headwise.kernels import (  # noqa: E402
    triton_decode,
    triton_kv_write,
    triton_merge,
    triton_norm,
    triton_ops,
    triton_prefill,
    triton_prefix,
    triton_rope,
)
from headwise.kernels.layout import UNBOUNDED  # noqa: E402

_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5",
}
# opt-in shared memory per block by compute capability; a kernel over it fails to load
_SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_KERNELS = [
    (triton_decode, "_decode_split_kernel"),
    (triton_decode, "_decode_reduce_kernel"),
    (triton_prefix, "_paged_prefix_kernel"),
    (triton_prefill, "_sink_window_kernel"),
    (triton_kv_write, "_kv_write_kernel"),
    (triton_merge, "_merge_kernel"),
    (triton_norm, "_rms_norm_kernel"),
    (triton_rope, "_rope_kernel"),
]


class _CompileOnLaunch:
    """Stands in for a JITFunction: `kernel[grid](*args, **meta)` compiles, launches nothing."""

    def __init__(self, fn, target: GPUTarget, log: list[str]):
        self.fn, self.target, self.log = fn, target, log

    def __getitem__(self, grid):
        return self._compile

    def _compile(self, *args, **meta) -> None:
        options = {k: meta.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in meta}
        signature, attrs = {}, {}
        for i, (name, a) in enumerate(zip(self.fn.arg_names, args)):
            if isinstance(a, torch.Tensor):
                signature[name] = "*" + _TYPES[a.dtype]
                aligned = a.data_ptr() % 16 == 0
            elif isinstance(a, int):
                signature[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
                aligned = a % 16 == 0
            else:
                signature[name] = "fp32"
                aligned = False
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in meta})
        backend = triton.compiler.make_backend(self.target)
        start = time.perf_counter()
        kernel = triton.compile(
            ASTSource(self.fn, signature, meta, attrs),
            target=self.target,
            options=backend.parse_options(options).__dict__,
        )
        consts = ",".join(f"{k}={v}" for k, v in meta.items())
        smem = kernel.metadata.shared
        limit = _SMEM_LIMIT.get(self.target.arch, 101376)
        if smem > limit:
            raise RuntimeError(
                f"{self.fn.__name__}[{consts}] needs {smem} B of shared memory, sm_{self.target.arch} has {limit}"
            )
        self.log.append(f"{self.fn.__name__}[{consts}] smem {smem} B, {time.perf_counter() - start:.1f}s")


def _drive_ops(dtype: torch.dtype, head_dim: int, block_size: int, group: int) -> None:
    """Call each op once with shapes that reach every kernel (both decode paths)."""
    s, hkv, t = 2, 2, 8
    kc = torch.zeros(64, block_size, head_dim, dtype=dtype)
    vc = torch.zeros_like(kc)
    pc = torch.zeros(64, block_size, dtype=torch.int32)
    tables = torch.zeros(s, hkv, 16, dtype=torch.int32)
    lengths = torch.full((s, hkv), 40, dtype=torch.int32)
    q = torch.zeros(s, hkv * group, head_dim, dtype=dtype)
    rows = torch.arange(s, dtype=torch.int32)
    recent = torch.full((s, hkv), UNBOUNDED, dtype=torch.int32)
    recent[0, 0] = 8  # a bounded head: the position-mask branch
    saved = triton_decode.MIN_SPLIT_TOKENS
    for min_split in (triton_decode.TILE_TOKENS, 1 << 20):  # several splits + reduce, then one split
        triton_decode.MIN_SPLIT_TOKENS = min_split
        triton_ops.paged_decode(q, kc, vc, pc, tables, rows, lengths, lengths, recent, rows + 40, 0.1)
    triton_decode.MIN_SPLIT_TOKENS = saved
    qt = torch.zeros(t, hkv * group, head_dim, dtype=dtype)
    pos = torch.arange(t)
    seq = torch.zeros(t, dtype=torch.int64)
    triton_ops.paged_prefix(qt, pos, seq, kc, vc, pc, tables, rows, lengths, lengths, recent, 0.1)
    k = torch.zeros(t, hkv, head_dim, dtype=dtype)
    triton_ops.sink_window_prefill(qt, k, k, pos, torch.tensor([0, t]), lengths[:1], recent[:1], 0.1)
    triton_ops.kv_write(k, k, pos, torch.zeros(t, hkv, dtype=torch.int32), kc, vc, pc)
    lse = torch.zeros(t, hkv * group)
    triton_ops.merge_states(qt, lse, qt, lse)
    x = torch.zeros(t, 96 * head_dim // 16, dtype=dtype)  # a hidden size that is not a power of two
    w = torch.ones(x.shape[1], dtype=dtype)
    triton_ops.rms_norm(x, w, 1e-5)
    triton_ops.add_rms_norm(x, x, w, 1e-5)
    qkv = torch.zeros(t, (hkv * group + 2 * hkv) * head_dim, dtype=dtype)  # q and k as views of one projection
    cos_sin = torch.zeros(t, head_dim)
    triton_ops.apply_rotary(
        qkv[:, : hkv * group * head_dim].view(t, hkv * group, head_dim),
        qkv[:, hkv * group * head_dim : (hkv * group + hkv) * head_dim].view(t, hkv, head_dim),
        cos_sin[:, : head_dim // 2],
        cos_sin[:, head_dim // 2 :],
    )


def _drive_fp8_ops(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, block_size: int, group: int) -> None:
    """The ops that touch an fp8 cache (kernels/kv_quant.py): decode (both paths), prefix, kv_write."""
    s, hkv, t = 2, 2, 8
    kc = torch.zeros(64, block_size, head_dim, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    pc = torch.zeros(64, block_size, dtype=torch.int32)
    tables = torch.zeros(s, hkv, 16, dtype=torch.int32)
    lengths = torch.full((s, hkv), 40, dtype=torch.int32)
    scales = torch.ones(hkv)
    q = torch.zeros(s, hkv * group, head_dim, dtype=dtype)
    rows = torch.arange(s, dtype=torch.int32)
    recent = torch.full((s, hkv), UNBOUNDED, dtype=torch.int32)
    saved = triton_decode.MIN_SPLIT_TOKENS
    for min_split in (triton_decode.TILE_TOKENS, 1 << 20):
        triton_decode.MIN_SPLIT_TOKENS = min_split
        triton_ops.paged_decode(q, kc, vc, pc, tables, rows, lengths, lengths, recent, rows + 40, 0.1, scales, scales)
    triton_decode.MIN_SPLIT_TOKENS = saved
    qt = torch.zeros(t, hkv * group, head_dim, dtype=dtype)
    pos = torch.arange(t)
    seq = torch.zeros(t, dtype=torch.int64)
    triton_ops.paged_prefix(qt, pos, seq, kc, vc, pc, tables, rows, lengths, lengths, recent, 0.1, scales, scales)
    k = torch.zeros(t, hkv, head_dim, dtype=dtype)
    triton_ops.kv_write(k, k, pos, torch.zeros(t, hkv, dtype=torch.int32), kc, vc, pc, scales, scales)


def compile_all(arch: int, configs: list[tuple[torch.dtype, int, int, int]]) -> list[str]:
    """Compile every kernel for `arch` under each (dtype, head_dim, block_size, group)."""
    target = GPUTarget("cuda", arch, 32)
    log: list[str] = []
    originals = [(mod, name, getattr(mod, name)) for mod, name in _KERNELS]
    try:
        for mod, name, fn in originals:
            setattr(mod, name, _CompileOnLaunch(fn, target, log))
        for config in configs:
            _drive_ops(*config)
        for fp8_config in FP8_CONFIGS:
            _drive_fp8_ops(*fp8_config)
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    return log


DEFAULT_CONFIGS = [(torch.bfloat16, 128, 16, 4), (torch.float32, 64, 32, 3)]
# (query dtype, cache dtype, head_dim, block_size, group)
FP8_CONFIGS = [(torch.bfloat16, torch.float8_e4m3fn, 128, 16, 4), (torch.float16, torch.float8_e5m2, 64, 16, 3)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (80 = A100, 90 = H100)")
    args = parser.parse_args(argv)
    log = compile_all(args.arch, DEFAULT_CONFIGS)
    print("\n".join(log))
    print(f"compiled {len(log)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
