"""The pool's tensors: K, V and the position of every slot of every block."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVBuffers:
    k: torch.Tensor  # [num_blocks, block_size, D]
    v: torch.Tensor
    pos: torch.Tensor  # [num_blocks, block_size] int32
