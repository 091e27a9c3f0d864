"""Turns a scheduled step into model inputs on the device and runs the model.

Per step the host sends token ids and three ints per sequence (table row, first position,
token count) in one copy; the block tables live on the device (`kvcache.BlockTables`,
edited incrementally), and `step_inputs` derives positions, slot mappings, lengths and
masks there. Prefill chunks come first, then decode tokens.

`execute` (rank 0) turns scheduled sequences into a `StepInputs` of plain values; with tensor
parallelism it hands the inputs, the other ranks' table edits and compaction moves to
`remote` (engine/tp_workers.py) before running its own part; `run` executes step inputs on any
rank. Queries and outputs of the last prompt positions, which select heads and dynamic
plans decide on, are kept per table row on every rank (each rank holds its own heads').
"""

from __future__ import annotations

from typing import Protocol

import torch

from headwise.engine.attention import SelectionProbe
from headwise.engine.cuda_graphs import DecodeGraphs, StaticDecode
from headwise.engine.model import LlamaModel
from headwise.engine.sequence import Sequence
from headwise.engine.step_inputs import StepInputs, build_metadata, build_step_inputs
from headwise.engine.step_timer import NO_STEP_TIMER, NoStepTimer, StepTimer
from headwise.kernels import cpu_ops
from headwise.kernels.kv_quant import dequantize
from headwise.kvcache.prefill_selection import BoundedPrefill, ChunkSelection
from headwise.kvcache.selection import middle_scores
from headwise.kvcache.worker_kv import WorkerKV


class Remote(Protocol):
    """The other tensor-parallel ranks, as rank 0 drives them."""

    def step(self, inputs: StepInputs) -> None: ...


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: WorkerKV, device: str = "cpu"):
        """`kv`: this rank's device tables and pool tensors (the host bookkeeping stays with
        rank 0's KVCacheManager, which commits its table edits before each step)."""
        self.model = model
        self.kv = kv
        self.device = torch.device(device)
        if self.device.type == "cpu":
            model.pack_linears()
            model.copy_lm_head_column_major()
            cpu_ops.available()  # build the C++ ops now, not inside a first request
        self._pinned = self.device.type == "cuda"
        self.decode_graphs: StaticDecode | None = None
        self.remote: Remote | None = None
        self.probed: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # per table row, the scoring-window queries of a bounded prompt's earlier chunks
        self.window_q: dict[int, list[torch.Tensor | None]] = {}

    def capture_decode(self, max_batch: int, capture: bool = True) -> None:
        """Serve decode-only steps of up to `max_batch` sequences from padded static buffers,
        captured as CUDA graphs (`capture=False`: the same padded path, run eagerly)."""
        cls = DecodeGraphs if capture else StaticDecode
        self.decode_graphs = cls(self.model, self.kv, max_batch, self.device)

    def execute(
        self,
        scheduled: list[tuple[Sequence, int]],
        probe_window: dict[str, int],
        timer: StepTimer | NoStepTimer = NO_STEP_TIMER,
    ):
        """Run one step. `probe_window[request_id]` asks for the q / outputs of the
        last W prompt positions. Returns (hidden `[T, hidden]`, rows); `timer` is marked
        where the host's preparation ends and the model starts."""
        inputs, rows = build_step_inputs(scheduled, probe_window)
        if self.remote is not None:
            self.remote.step(inputs)
        return self.run(inputs, timer), rows

    def run(self, inputs: StepInputs, timer: StepTimer | NoStepTimer = NO_STEP_TIMER) -> torch.Tensor:
        """Hidden states `[T, hidden]` of a step on this rank."""
        packed = torch.tensor(inputs.packed, dtype=torch.int32)
        if self._pinned:
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True)
        t, s = inputs.num_tokens, inputs.num_seqs
        if (
            not inputs.num_prefill
            and not inputs.probes
            and self.decode_graphs is not None
            and s <= self.decode_graphs.max_batch
        ):
            timer.mark("prepare")
            return self.decode_graphs.run(packed, s)
        meta = build_metadata(
            self.kv.tables,
            self.kv.block_size,
            packed[t:].view(3, s),
            num_prefill=inputs.num_prefill,
            num_prefill_tokens=inputs.num_prefill_tokens,
            num_tokens=t,
            width=max(inputs.width, 1),
            max_seqlen=inputs.max_seqlen,
            has_cache=inputs.has_cache,
            all_full=inputs.all_full,
            self_visible=inputs.self_visible,
        )
        if inputs.probes:
            rows = [i for _, first, n, _ in inputs.probes for i in range(first, first + n)]
            meta.probe = SelectionProbe(rows=torch.tensor(rows).to(self.device, non_blocking=True))
        if inputs.selections:
            meta.selections = [self._chunk_selection(*s) for s in inputs.selections]
        timer.mark("prepare")
        hidden = self.model(packed[:t], meta, self.kv.buffers)
        for c in meta.selections or []:
            if c.end < c.prompt_len and any(w is not None for w in c.window_q):
                self.window_q[c.table_row] = c.window_q
            else:
                self.window_q.pop(c.table_row, None)
        if inputs.num_prefill:
            self.kv.buffers.calibrating = False  # fp8 scales are fixed from now on
        if meta.probe is not None:
            self._keep_probe(inputs, meta.probe)
        return hidden

    def _chunk_selection(self, row: int, first: int, start: int, count: int, bounded: BoundedPrefill) -> ChunkSelection:
        """This rank's part of a bounded prompt chunk's selection (its own heads)."""
        layers, heads = self.kv.tables.dev.shape[0], self.kv.tables.dev.shape[2]
        groups = [bounded.groups(layer, self.kv.first_head, heads) for layer in range(layers)]
        window_q = self.window_q.get(row) if start else None
        return ChunkSelection(row, first, start, count, bounded.prompt_len, groups, window_q or [None] * layers)

    def _keep_probe(self, inputs: StepInputs, probe: SelectionProbe) -> None:
        at = 0
        for row, _, n, starts in inputs.probes:
            qs = [q[at : at + n] for q in probe.q]
            outs = [o[at : at + n] for o in probe.out]
            if not starts and row in self.probed:
                old_q, old_out = self.probed[row]
                qs = [torch.cat([a, b]) for a, b in zip(old_q, qs)]
                outs = [torch.cat([a, b]) for a, b in zip(old_out, outs)]
            self.probed[row] = (qs, outs)
            at += n

    def selection_inputs(self, row: int, prompt_len: int, with_outputs: bool):
        """This rank's part of the end-of-prompt selection of the request in table `row`:
        middle-token scores `[L, Hkv_local, P]` of its heads (from the kept queries and the
        prompt's keys in its pool), and the kept attention outputs `[L, W, Hq_local, D]`
        when a dynamic plan needs them; both on the host. Forgets the kept tensors."""
        qs, outs = self.probed.pop(row)
        w = qs[0].shape[0]
        tables, buffers, bs = self.kv.tables, self.kv.buffers, self.kv.block_size
        nb = -(-prompt_len // bs)
        # pending heads are positional: their first nb entries are the prompt's blocks
        ids = tables.dev[:, row, :, :nb].long()  # [L, k, nb]
        q_pos = torch.arange(prompt_len - w, prompt_len, device=buffers.k.device)
        scale = buffers.k.shape[-1] ** -0.5
        scores = []
        for layer in range(ids.shape[0]):
            k = dequantize(buffers.k[ids[layer]], buffers.scales(layer)[0], 0)
            k = k.reshape(ids.shape[1], nb * bs, -1)[:, :prompt_len]
            scores.append(middle_scores(qs[layer], q_pos, k.transpose(0, 1), scale))
        # one transfer for all layers
        return torch.stack(scores).cpu(), torch.stack(outs).cpu() if with_outputs else None


def rows_of(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`hidden[rows]` for increasing `rows`; the index goes to the device pinned and
    non-blocking, since a blocking copy would wait for the forward to finish."""
    if len(rows) == hidden.shape[0]:  # every row (a decode-only step): no gather
        return hidden
    index = torch.tensor(rows)
    if hidden.is_cuda:
        index = index.pin_memory().to(hidden.device, non_blocking=True)
    return hidden[index]
