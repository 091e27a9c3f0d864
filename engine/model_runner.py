"""Turns a scheduled step into model inputs on the device and runs the model.

Per step the host sends token ids and three ints per sequence (table row, first position,
token count) in one copy; the block tables live on the device (`kvcache.BlockTables`,
edited incrementally), and `step_inputs` derives positions, slot mappings, lengths and
masks there. Prefill chunks come first, then decode tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.engine.attention import CaptureMeta
from headwise.engine.cuda_graphs import DecodeGraphs, StaticDecode
from headwise.engine.model import LlamaModel
from headwise.engine.sequence import Sequence
from headwise.engine.step_inputs import build_metadata
from headwise.engine.step_timer import NO_STEP_TIMER, NoStepTimer, StepTimer
from headwise.kvcache.manager import KVCacheManager


@dataclass
class StepRows:
    seq: Sequence
    start: int  # first position computed this step
    end: int
    row: int  # first row of this sequence in the step's hidden states


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_manager: KVCacheManager, device: str = "cpu"):
        self.model = model
        self.kv_manager = kv_manager
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self.decode_graphs: StaticDecode | None = None

    def capture_decode(self, max_batch: int, capture: bool = True) -> None:
        """Serve decode-only steps of up to `max_batch` sequences from padded static buffers,
        captured as CUDA graphs (`capture=False`: the same padded path, run eagerly)."""
        cls = DecodeGraphs if capture else StaticDecode
        self.decode_graphs = cls(self.model, self.kv_manager, max_batch, self.device)

    def execute(self, scheduled: list[tuple[Sequence, int]], capture_window: dict[str, int],
                timer: StepTimer | NoStepTimer = NO_STEP_TIMER):
        """Run one step. `capture_window[request_id]` asks for the q / outputs of the
        last W prompt positions. Returns (hidden `[T, hidden]`, rows, capture); `timer`
        is marked where the host's preparation ends and the model starts."""
        prefill = [(s, n) for s, n in scheduled if n > 1]
        decode = [(s, n) for s, n in scheduled if n == 1]
        ids: list[int] = []
        rows, cap_rows = [], []
        info = [[], [], []]  # table row, first position, token count per sequence
        width = max_seqlen = 0
        has_cache = False
        all_full = True
        for i, (seq, n) in enumerate(prefill + decode):
            tables = seq.tables
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            rows.append(StepRows(seq, start, end, len(ids)))
            w = capture_window.get(seq.request_id)
            if w:
                lo = max(start, seq.num_prompt_tokens - w)
                cap_rows.extend(range(len(ids) + lo - start, len(ids) + min(end, seq.num_prompt_tokens) - start))
            ids.extend(seq.all_token_ids[start:end])
            info[0].append(tables.row)
            info[1].append(start)
            info[2].append(n)
            width = max(width, int(tables.nent.max()))
            if i < len(prefill):
                max_seqlen = max(max_seqlen, n)
                has_cache |= start > 0
                all_full &= tables.all_unbounded
        block_tables = self.kv_manager.tables
        block_tables.commit()
        packed = torch.tensor(ids + info[0] + info[1] + info[2], dtype=torch.int32)
        if self._pinned:
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True)
        t, s = len(ids), len(info[0])
        if not prefill and not cap_rows and self.decode_graphs is not None and s <= self.decode_graphs.max_batch:
            timer.mark("prepare")
            return self.decode_graphs.run(packed, s), rows, None
        meta = build_metadata(
            block_tables, self.kv_manager.block_size, packed[t:].view(3, s), num_prefill=len(prefill),
            num_prefill_tokens=sum(n for _, n in prefill), num_tokens=t, width=max(width, 1),
            max_seqlen=max_seqlen, has_cache=has_cache, all_full=all_full)
        if cap_rows:
            meta.capture = CaptureMeta(rows=torch.tensor(cap_rows, device=self.device))
        timer.mark("prepare")
        hidden = self.model(packed[:t], meta, self.kv_manager.buffers)
        return hidden, rows, meta.capture
