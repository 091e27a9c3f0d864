"""Persistent per-head block tables of the running requests, on the host and the device.

One row per running request, stable while it runs (vLLM v1's persistent batch; the
`[layers, seqs, kv_heads, blocks]` layout of KV-Compress). The host mirror (pinned on
CUDA) is authoritative: every edit records the flat indices it changed, and `commit()`
copies only those entries to the device once per step, so no step rebuilds whole tables.
On the CPU with one rank the device tensors are the host tensors and nothing is copied.

Per-head parameters the device turns into slot mappings, lengths and masks each step
(docs/design.md, "KV cache"):
- gap: a positional head's slot of position j is j - gap * block_size (window heads drop
  the blocks that left their window; full heads have gap 0);
- ring: -1 for positional heads; >= 0 for compacted select heads, whose position j >= sink
  lives at slot keep + (j - sink) % ring (ring 0 drops it);
- sink, keep, recent: the mask (slot < keep always visible, else position > q - recent).
The last row is padding: ring 0 and keep 0, so a padded decode entry writes nothing and
reads nothing.

With tensor parallelism the host mirror covers every head (columns rank-major, block ids
global: rank r's are [r * P, (r + 1) * P)); each rank's device copy (`DeviceTables`) holds
its own heads with rank-local ids. `commit()` applies rank 0's edits and returns the other
ranks' for their workers.
"""

from __future__ import annotations

import numpy as np
import torch

PARAMS = ("gap", "ring", "sink", "keep", "recent")
Edits = tuple[np.ndarray, np.ndarray]  # (flat indices, values) of one tensor


class DeviceTables:
    """One rank's block tables on its device: `dev [L, R + 1, k, W]` rank-local block ids and
    `dev_params [P, L, R + 1, k]`."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        heads: int,
        width: int,
        device: torch.device,
        host: torch.Tensor | None = None,
        host_params: torch.Tensor | None = None,
    ):
        self.device = device
        self.width = width
        self.pad_row = rows - 1
        if host is not None:  # the host mirror itself (one rank on the CPU)
            assert host_params is not None
            self.dev, self.dev_params = host, host_params
        else:
            self.dev = torch.zeros(num_layers, rows, heads, width, dtype=torch.int32, device=device)
            self.dev_params = torch.zeros(len(PARAMS), num_layers, rows, heads, dtype=torch.int32, device=device)
            self.dev_params[PARAMS.index("ring"), :, self.pad_row] = 0
        self._stage: dict[str, torch.Tensor] = {}  # pinned staging, grown on demand

    def apply(self, table: Edits | None, params: Edits | None) -> None:
        """Scatter edits into the device tensors: one pinned copy of (index, value) pairs
        and one scatter per tensor. The engine synchronises once per step (the sampled
        tokens), so a staging buffer is not reused before its copy ran."""
        for name, edits, dev in (("table", table, self.dev), ("params", params, self.dev_params)):
            if edits is None or not len(edits[0]):
                continue
            idx, values = edits
            n = len(idx)
            stage = self._stage.get(name)
            if stage is None or stage.shape[1] < n:
                stage = torch.empty(2, max(n, 1024), dtype=torch.int64, pin_memory=self.device.type == "cuda")
                self._stage[name] = stage
            stage[0, :n] = torch.from_numpy(idx)
            stage[1, :n] = torch.from_numpy(values.astype(np.int64))
            pairs = stage[:, :n].to(self.device, non_blocking=True)
            dev.view(-1)[pairs[0]] = pairs[1].to(torch.int32)


class BlockTables:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        max_rows: int,
        max_blocks_per_head: int,
        device: str | torch.device = "cpu",
        ranks: int = 1,
        blocks_per_rank: int = 0,
    ):
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.max_rows = max_rows
        self.width = max_blocks_per_head
        self.device = torch.device(device)
        self.pad_row = max_rows
        self.ranks, self.blocks_per_rank = ranks, blocks_per_rank
        rows = max_rows + 1
        pin = self.device.type == "cuda"
        self.host = torch.zeros(num_layers, rows, num_kv_heads, max_blocks_per_head, dtype=torch.int32, pin_memory=pin)
        self.host_params = torch.zeros(len(PARAMS), num_layers, rows, num_kv_heads, dtype=torch.int32, pin_memory=pin)
        self.table = self.host.numpy()  # [L, R + 1, Hkv, W]
        self.params = self.host_params.numpy()  # [P, L, R + 1, Hkv]
        self.params[PARAMS.index("ring"), :, self.pad_row] = 0
        self._mirrored = self.device.type == "cpu" and ranks == 1
        self.local = DeviceTables(
            num_layers,
            rows,
            num_kv_heads // ranks,
            max_blocks_per_head,
            self.device,
            *((self.host, self.host_params) if self._mirrored else ()),
        )
        self._dirty: list[np.ndarray] = []
        self._dirty_params: list[np.ndarray] = []
        self._free_rows = list(range(max_rows - 1, -1, -1))

    @property
    def dev(self) -> torch.Tensor:
        return self.local.dev

    @property
    def dev_params(self) -> torch.Tensor:
        return self.local.dev_params

    # -- rows ------------------------------------------------------------------------
    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def allocate_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    # -- edits (host mirror + the flat indices to copy) ------------------------------
    def set_entries(self, row: int, layer: np.ndarray, head: np.ndarray, index: np.ndarray, blocks: np.ndarray) -> None:
        """table[layer, row, head, index] = blocks (arrays of one length)."""
        self.table[layer, row, head, index] = blocks
        if not self._mirrored:
            rows, hkv, w = self.table.shape[1:]
            self._dirty.append(((layer * rows + row) * hkv + head) * w + index)

    def set_row_span(self, row: int, layer: int, head: int, start: int, blocks: np.ndarray) -> None:
        """table[layer, row, head, start:start + len(blocks)] = blocks."""
        self.table[layer, row, head, start : start + len(blocks)] = blocks
        if not self._mirrored and len(blocks):
            rows, hkv, w = self.table.shape[1:]
            base = ((layer * rows + row) * hkv + head) * w
            self._dirty.append(base + start + np.arange(len(blocks)))

    def set_params(self, row: int, **values: np.ndarray) -> None:
        """Per-head parameters of one row: each value `[L, Hkv]`."""
        for name, value in values.items():
            self.params[PARAMS.index(name), :, row] = value
        if not self._mirrored:
            _, layers, rows, hkv = self.params.shape
            heads = np.arange(layers * hkv)
            flat_rows = (heads // hkv * rows + row) * hkv + heads % hkv
            for name in values:
                self._dirty_params.append(PARAMS.index(name) * layers * rows * hkv + flat_rows)

    def commit(self) -> list[tuple[Edits | None, Edits | None]]:
        """Apply the edits since the last commit to rank 0's device tables; returns the
        other ranks' (table, params) edits, rank-local, for their workers."""
        if self._mirrored:
            return []
        table = self._split(self._dirty, self.table, ids=True)
        params = self._split(self._dirty_params, self.params, ids=False)
        self.local.apply(table[0], params[0])
        return list(zip(table[1:], params[1:]))

    def _split(self, dirty: list[np.ndarray], host: np.ndarray, ids: bool) -> list[Edits | None]:
        """Dirty flat indices of a full-width host tensor -> per-rank (local index, value)."""
        if not dirty:
            return [None] * self.ranks
        idx = np.unique(np.concatenate(dirty))
        dirty.clear()
        values = host.reshape(-1)[idx].astype(np.int64)
        if self.ranks == 1:
            return [(idx, values)]
        shape = host.shape  # [..., Hkv, W] for the table, [..., Hkv] for the params
        head_axis = 2 if ids else 3
        coords = list(np.unravel_index(idx, shape))
        k = self.num_kv_heads // self.ranks
        rank = coords[head_axis] // k
        coords[head_axis] = coords[head_axis] % k
        local_shape = list(shape)
        local_shape[head_axis] = k
        local = np.ravel_multi_index(tuple(coords), tuple(local_shape))
        if ids:  # global block ids -> rank-local (placeholders stay negative)
            values = np.where(values >= 0, values - rank * self.blocks_per_rank, values)
        return [(local[rank == r], values[rank == r]) for r in range(self.ranks)]
