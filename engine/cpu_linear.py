"""CPU matmuls from prepacked weights (what vLLM's CPU backend does for its linears).

Two layouts, chosen by dtype:
- fp32: `kernels/cpu_ops.pack_columns` ([N / 32, K, 32]) multiplied by the C++ `linear_columns`
  for 1-32 rows (decode batches), which streams the weight once per 8 rows with prefetching;
  prefill chunks stay on MKL's kernel over the plain weight (both are kept).
- bf16 (and fp32 where the C++ ops did not build, or N is no multiple of 32): oneDNN's blocked
  layout from `torch.ops.mkldnn._reorder_linear_weight`, multiplied by `_linear_pointwise`.

Measured on the default model's 120 decoder projections per step, one thread, ms for 1 / 2 / 4 /
8 / 16 / 32 / 64 / 128 / 512 rows (scripts in docs/benchmarks.md, issue 24):
- fp32, Xeon with AVX-512: column-major MKL 27.3 / 34.5 / 38.9 / 54.0 / 62.7 / 73.0 / 93.2 /
  176 / 708, oneDNN packed 31.3 / 32.5 / 35.9 / 42.0 / 51.8 / 73.6 / 114 / 194 / 706,
  `linear_columns` (same session as a second oneDNN run: 30.7 / 32.3 / 35.3 / 42.6 / 51.7 / 73.3)
  26.5 / 27.6 / 30.4 / 32.8 / 46.7 / 63.9;
- fp32, EPYC with AVX2: column-major 28.3 / 46.9 / 74.5 / 78.9 / 98.9 / 173 / - / 358 / 1617,
  oneDNN packed 35.9 / 36.1 / 57.3 / 63.4 / 75.5 / 116 / - / 393 / 1410;
- bf16, Xeon with AVX512-BF16: row-major 27.3 / - / - / 45.2 / 66.6 / - / 176 / - / 1289,
  oneDNN packed 20.2 / - / - / 35.1 / 49.3 / - / 164 / - / 1268.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.kernels import cpu_ops

# rows a oneDNN-packed weight serves, by dtype (others: none); the batch size oneDNN blocks for
PACKED_ROWS = {torch.float32: (2, 32), torch.bfloat16: (1, 1 << 62)}
PACK_BATCH_HINT = 64
# rows a `pack_columns` weight serves (fp32)
COLUMNS_ROWS = (1, 32)


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packs this weight: a 2-D fp32 / bf16 matrix on the CPU, with mkldnn built in."""
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.dtype in PACKED_ROWS
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def takes_columns(weight: torch.Tensor) -> bool:
    """The fp32 column-block layout serves this weight: the C++ ops built, N a multiple of 32."""
    return weight.dtype == torch.float32 and weight.shape[0] % cpu_ops.COLUMNS == 0 and cpu_ops.serves(weight)


@dataclass(frozen=True)
class PackedWeight:
    """A weight `[out, in]` packed for inputs of `lo`..`hi` rows: oneDNN's blocked layout, or
    (`columns`) cpu_ops' `[out / 32, in, 32]`."""

    blocked: torch.Tensor
    lo: int
    hi: int
    columns: bool = False

    @staticmethod
    @torch.no_grad()
    def of(weight: torch.Tensor, rows: tuple[int, int] | None = None) -> PackedWeight:
        """The column-block layout where it serves (fp32), else oneDNN's; `rows` forces
        oneDNN's layout for that row range."""
        w = weight.detach().contiguous()
        if rows is None and takes_columns(w):
            return PackedWeight(cpu_ops.pack_columns(w), *COLUMNS_ROWS, columns=True)
        lo, hi = rows or PACKED_ROWS[w.dtype]
        return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT), lo, hi)

    def serves(self, x: torch.Tensor) -> bool:
        """`x` is a 2-D input of `lo`..`hi` rows and no gradient is wanted: neither kernel has a
        backward, so a profiler that backpropagates (duo) must take the plain weight."""
        return x.dim() == 2 and self.lo <= x.shape[0] <= self.hi and not torch.is_grad_enabled()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.columns:
            y = cpu_ops.linear_columns(x, self.blocked)
            return y if bias is None else y.add_(bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.blocked, bias, "none", [], "")
