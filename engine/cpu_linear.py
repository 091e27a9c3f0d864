"""CPU matmuls from oneDNN-prepacked weights (what vLLM's CPU backend does for its linears).

`torch.ops.mkldnn._reorder_linear_weight` lays a weight out in oneDNN's blocked format once;
`_linear_pointwise` then multiplies without the per-call packing MKL's sgemm does. Measured on
the default model's 120 decoder projections per step, one thread, ms for 1 / 2 / 4 / 8 / 16 / 32
/ 64 / 128 / 512 rows (scripts in docs/benchmarks.md, issue 24):
- fp32, Xeon with AVX-512: column-major MKL 27.3 / 34.5 / 38.9 / 54.0 / 62.7 / 73.0 / 93.2 /
  176 / 708, packed 31.3 / 32.5 / 35.9 / 42.0 / 51.8 / 73.6 / 114 / 194 / 706;
- fp32, EPYC with AVX2: column-major 28.3 / 46.9 / 74.5 / 78.9 / 98.9 / 173 / - / 358 / 1617,
  packed 35.9 / 36.1 / 57.3 / 63.4 / 75.5 / 116 / - / 393 / 1410;
- bf16, Xeon with AVX512-BF16: row-major 27.3 / - / - / 45.2 / 66.6 / - / 176 / - / 1289,
  packed 20.2 / - / - / 35.1 / 49.3 / - / 164 / - / 1268.
So fp32 takes the packed copy for 2-32 rows (one decode row and prefill chunks stay on MKL's
column-major kernel, which needs the plain weight: both are kept) and bf16 for every row count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# rows a packed weight serves, by dtype (others: none); the batch size oneDNN blocks for
PACKED_ROWS = {torch.float32: (2, 32), torch.bfloat16: (1, 1 << 62)}
PACK_BATCH_HINT = 64


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packs this weight: a 2-D fp32 / bf16 matrix on the CPU, with mkldnn built in."""
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.dtype in PACKED_ROWS
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@dataclass(frozen=True)
class PackedWeight:
    """A weight `[out, in]` in oneDNN's blocked layout, used for inputs of `lo`..`hi` rows."""

    blocked: torch.Tensor
    lo: int
    hi: int

    @staticmethod
    @torch.no_grad()
    def of(weight: torch.Tensor, rows: tuple[int, int] | None = None) -> PackedWeight:
        lo, hi = rows or PACKED_ROWS[weight.dtype]
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
        return PackedWeight(blocked, lo, hi)

    def serves(self, x: torch.Tensor) -> bool:
        """`x` is a 2-D input of `lo`..`hi` rows and no gradient is wanted: `_linear_pointwise`
        has no backward, so a profiler that backpropagates (duo) must take the plain weight."""
        return x.dim() == 2 and self.lo <= x.shape[0] <= self.hi and not torch.is_grad_enabled()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.blocked, bias, "none", [], "")
