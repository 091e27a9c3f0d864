"""Persistent per-head block tables of the running requests, on the host and the device.

One row per running request, stable while it runs (vLLM v1's persistent batch; the
`[layers, seqs, kv_heads, blocks]` layout of KV-Compress). The host mirror (pinned on
CUDA) is authoritative: every edit records the flat indices it changed, and `commit()`
copies only those entries to the device once per step, so no step rebuilds whole tables.
On the CPU the device tensors are the host tensors and nothing is copied.

Per-head parameters the device turns into slot mappings, lengths and masks each step
(docs/design.md, "KV cache"):
- gap: a positional head's slot of position j is j - gap * block_size (window heads drop
  the blocks that left their window; full heads have gap 0);
- ring: -1 for positional heads; >= 0 for compacted select heads, whose position j >= sink
  lives at slot keep + (j - sink) % ring (ring 0 drops it);
- sink, keep, recent: the mask (slot < keep always visible, else position > q - recent).
The last row is padding: ring 0 and keep 0, so a padded decode entry writes nothing and
reads nothing.
"""

from __future__ import annotations

import numpy as np
import torch

PARAMS = ("gap", "ring", "sink", "keep", "recent")


class BlockTables:
    def __init__(self, num_layers: int, num_kv_heads: int, max_rows: int, max_blocks_per_head: int,
                 device: str | torch.device = "cpu"):
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.max_rows = max_rows
        self.width = max_blocks_per_head
        self.device = torch.device(device)
        self.pad_row = max_rows
        rows = max_rows + 1
        pin = self.device.type == "cuda"
        self.host = torch.zeros(num_layers, rows, num_kv_heads, max_blocks_per_head, dtype=torch.int32,
                                pin_memory=pin)
        self.host_params = torch.zeros(len(PARAMS), num_layers, rows, num_kv_heads, dtype=torch.int32,
                                       pin_memory=pin)
        self.table = self.host.numpy()  # [L, R + 1, Hkv, W]
        self.params = self.host_params.numpy()  # [P, L, R + 1, Hkv]
        self.params[PARAMS.index("ring"), :, self.pad_row] = 0
        if self.device.type == "cpu":
            self.dev, self.dev_params = self.host, self.host_params
        else:
            self.dev = self.host.to(self.device)
            self.dev_params = self.host_params.to(self.device)
        self._dirty: list[np.ndarray] = []
        self._dirty_params: list[np.ndarray] = []
        self._stage: dict[str, torch.Tensor] = {}  # pinned staging for commit, grown on demand
        self._free_rows = list(range(max_rows - 1, -1, -1))

    # -- rows ------------------------------------------------------------------------
    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def allocate_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    # -- edits (host mirror + the flat indices to copy) ------------------------------
    def set_entries(self, row: int, layer: np.ndarray, head: np.ndarray, index: np.ndarray,
                    blocks: np.ndarray) -> None:
        """table[layer, row, head, index] = blocks (arrays of one length)."""
        self.table[layer, row, head, index] = blocks
        if self.dev is not self.host:
            rows, hkv, w = self.table.shape[1:]
            self._dirty.append(((layer * rows + row) * hkv + head) * w + index)

    def set_row_span(self, row: int, layer: int, head: int, start: int, blocks: np.ndarray) -> None:
        """table[layer, row, head, start:start + len(blocks)] = blocks."""
        self.table[layer, row, head, start:start + len(blocks)] = blocks
        if self.dev is not self.host and len(blocks):
            rows, hkv, w = self.table.shape[1:]
            base = ((layer * rows + row) * hkv + head) * w
            self._dirty.append(base + start + np.arange(len(blocks)))

    def set_params(self, row: int, **values: np.ndarray) -> None:
        """Per-head parameters of one row: each value `[L, Hkv]`."""
        for name, value in values.items():
            self.params[PARAMS.index(name), :, row] = value
        if self.dev is not self.host:
            _, layers, rows, hkv = self.params.shape
            heads = np.arange(layers * hkv)
            flat_rows = (heads // hkv * rows + row) * hkv + heads % hkv
            for name in values:
                self._dirty_params.append(PARAMS.index(name) * layers * rows * hkv + flat_rows)

    def commit(self) -> None:
        """Copy the entries edited since the last commit to the device: one pinned staging
        copy of (index, value) pairs per tensor and one scatter, whatever changed. The
        engine synchronises once per step (the sampled tokens), so a staging buffer is not
        reused before its copy ran."""
        for name, dirty, host, dev in (("table", self._dirty, self.host, self.dev),
                                       ("params", self._dirty_params, self.host_params, self.dev_params)):
            if not dirty:
                continue
            idx = np.unique(np.concatenate(dirty))
            dirty.clear()
            n = len(idx)
            stage = self._stage.get(name)
            if stage is None or stage.shape[1] < n:
                stage = torch.empty(2, max(n, 1024), dtype=torch.int64, pin_memory=True)
                self._stage[name] = stage
            stage[0, :n] = torch.from_numpy(idx)
            stage[1, :n] = host.view(-1)[stage[0, :n]]
            pairs = stage[:, :n].to(self.device, non_blocking=True)
            dev.view(-1)[pairs[0]] = pairs[1].to(torch.int32)
