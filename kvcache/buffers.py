"""The pool's tensors: K, V and the position of every slot of every block, and the fp8
scales of K and V per (layer, KV head) when the cache is 8-bit (kernels/kv_quant.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVBuffers:
    k: torch.Tensor  # [num_blocks, block_size, D]
    v: torch.Tensor
    pos: torch.Tensor  # [num_blocks, block_size] int32
    k_scale: torch.Tensor | None = None  # [L, Hkv] float32 (this rank's heads); None: K/V in the model's dtype
    v_scale: torch.Tensor | None = None
    # the next step with a prefill sets the scales from the K / V it writes, layer by layer
    calibrating: bool = False

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) `[Hkv]` of one layer, or (None, None)."""
        if self.k_scale is None or self.v_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]
