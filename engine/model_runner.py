"""Turns a scheduled step into flat model inputs and attention metadata, runs the model."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from headwise.engine.attention import AttentionMetadata, CaptureMeta, DecodeMeta, PrefillMeta
from headwise.engine.model import LlamaModel
from headwise.kernels.layout import UNBOUNDED
from headwise.engine.sequence import Sequence
from headwise.kvcache.manager import KVCacheManager


@dataclass
class StepRows:
    seq: Sequence
    start: int  # first position computed this step
    end: int
    row: int  # first row of this sequence in the step's hidden states


def _stack_tables(seqs: list[Sequence]) -> torch.Tensor:
    """Block tables `[L, S, Hkv, nb]` trimmed to the longest head list in the batch."""
    nb = max(1, max(int(s.tables.nblocks.max()) for s in seqs))
    return torch.stack([s.tables.table[:, :, :nb] for s in seqs], dim=1)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_manager: KVCacheManager, device: str = "cpu"):
        self.model = model
        self.kv_manager = kv_manager
        self.device = device

    def execute(self, scheduled: list[tuple[Sequence, int]], capture_window: dict[str, int]):
        """Run one step. `capture_window[request_id]` asks for the q / outputs of the
        last W prompt positions. Returns (hidden `[T, hidden]`, rows, capture)."""
        prefill = [(s, n) for s, n in scheduled if n > 1]
        decode = [(s, n) for s, n in scheduled if n == 1]
        ids: list[int] = []
        positions, slots, rows, cap_rows = [], [], [], []
        pf_len, pf_args = [], []
        for seq, n in prefill + decode:
            tables = seq.tables
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            rows.append(StepRows(seq, start, end, len(ids)))
            w = capture_window.get(seq.request_id)
            if w:
                lo = max(start, seq.num_prompt_tokens - w)
                cap_rows.extend(range(len(ids) + lo - start, len(ids) + min(end, seq.num_prompt_tokens) - start))
            ids.extend(seq.all_token_ids[start:end])
            positions.append(torch.arange(start, end))
            r, new_lengths = tables.slots_for(start, end)
            slots.append(tables.flat_slots(r))
            if n > 1:
                pf_len.append(tables.lengths.clone())
                pf_args.append(tables.mask_args())
            tables.lengths = new_lengths
            tables.num_tokens = end
        pos = torch.cat(positions)
        meta = AttentionMetadata(positions=pos, slot_mapping=torch.cat(slots, dim=1), prefill=None, decode=None)
        if prefill:
            seqs = [s for s, _ in prefill]
            counts = torch.tensor([n for _, n in prefill])
            tp = int(counts.sum())
            keep, sink, recent = (torch.stack([a[i] for a in pf_args], dim=1) for i in range(3))
            meta.prefill = PrefillMeta(
                num_tokens=tp, positions=pos[:tp],
                seq_index=torch.repeat_interleave(torch.arange(len(seqs)), counts),
                cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).int(),
                has_cache=any(s.num_computed_tokens > 0 for s in seqs),
                all_full=bool((recent >= UNBOUNDED).all()),
                block_tables=_stack_tables(seqs), lengths=torch.stack(pf_len, dim=1),
                keep=keep, sink=sink, recent=recent)
        if decode:
            seqs = [s for s, _ in decode]
            meta.decode = DecodeMeta(num_tokens=len(seqs), block_tables=_stack_tables(seqs),
                                     lengths=torch.stack([s.tables.lengths for s in seqs], dim=1))
        if cap_rows:
            meta.capture = CaptureMeta(rows=torch.tensor(cap_rows))
        if torch.device(self.device).type != "cpu":
            _to_device(meta, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), meta, self.kv_manager.buffers)
        return hidden, rows, meta.capture


def _to_device(obj, device) -> None:
    """Metadata is built on the host; the kernels read it on the model's device."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            setattr(obj, f.name, value.to(device, non_blocking=True))
        elif value is not None and hasattr(value, "__dataclass_fields__"):
            _to_device(value, device)
