"""The cache contract every layer above the kernels shares (docs/design.md, "KV cache").

One pool for all layers and KV heads: `k` / `v` `[num_blocks, block_size, head_dim]` and
`pos` `[num_blocks, block_size]` (int32, the token position stored in each slot). A
(sequence, layer, KV head) owns a list of blocks (its block-table row) and a length in slots.
A head whose `recent` is `UNBOUNDED` sees every cached slot (a full head).
"""

from __future__ import annotations

UNBOUNDED = 1 << 30  # `recent` of a full head
