"""Turns a scheduled step into model inputs on the device and runs the model.

Per step the host sends token ids and three ints per sequence (table row, first position,
token count) in one copy; the block tables live on the device (`kvcache.BlockTables`,
edited incrementally), and `step_inputs` derives positions, slot mappings, lengths and
masks there. Prefill chunks come first, then decode tokens.

`execute` (rank 0) turns scheduled sequences into a `StepPlan` of plain values; with tensor
parallelism it hands the plan, the other ranks' table edits and compaction moves to
`remote` (engine/tp_workers.py) before running its own part; `run` executes a plan on any
rank. Queries and outputs of the last prompt positions, which select heads and dynamic
plans decide on, are kept per table row on every rank (each rank holds its own heads').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from headwise.engine.attention import CaptureMeta
from headwise.engine.cuda_graphs import DecodeGraphs, StaticDecode
from headwise.engine.model import LlamaModel
from headwise.engine.sequence import Sequence
from headwise.engine.step_inputs import build_metadata
from headwise.engine.step_timer import NO_STEP_TIMER, NoStepTimer, StepTimer
from headwise.kvcache.selection import middle_scores
from headwise.kvcache.worker_kv import WorkerKV


@dataclass
class StepRows:
    seq: Sequence
    start: int  # first position computed this step
    end: int
    row: int  # first row of this sequence in the step's hidden states


@dataclass
class StepPlan:
    """One step as every rank runs it: token ids then per sequence (table row, first
    position, token count), prefill chunks first, and host-known flags."""

    packed: list[int]
    num_tokens: int
    num_seqs: int
    num_prefill: int
    num_prefill_tokens: int
    width: int  # widest table row of the batch
    max_seqlen: int
    has_cache: bool
    all_full: bool
    self_visible: bool  # every prefill head sees at least its own token
    # (table row, first step row, rows, whether it starts the request's window) to keep
    capture: list[tuple[int, int, int, bool]] = field(default_factory=list)


class Remote(Protocol):
    """The other tensor-parallel ranks, as rank 0 drives them."""

    def step(self, plan: StepPlan) -> None: ...


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: WorkerKV, device: str = "cpu"):
        """`kv`: this rank's device tables and pool tensors (the host bookkeeping stays with
        rank 0's KVCacheManager, which commits its table edits before each step)."""
        self.model = model
        self.kv = kv
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self.decode_graphs: StaticDecode | None = None
        self.remote: Remote | None = None
        self.captured: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def capture_decode(self, max_batch: int, capture: bool = True) -> None:
        """Serve decode-only steps of up to `max_batch` sequences from padded static buffers,
        captured as CUDA graphs (`capture=False`: the same padded path, run eagerly)."""
        cls = DecodeGraphs if capture else StaticDecode
        self.decode_graphs = cls(self.model, self.kv, max_batch, self.device)

    def execute(
        self,
        scheduled: list[tuple[Sequence, int]],
        capture_window: dict[str, int],
        timer: StepTimer | NoStepTimer = NO_STEP_TIMER,
    ):
        """Run one step. `capture_window[request_id]` asks for the q / outputs of the
        last W prompt positions. Returns (hidden `[T, hidden]`, rows); `timer` is marked
        where the host's preparation ends and the model starts."""
        plan, rows = plan_step(scheduled, capture_window)
        if self.remote is not None:
            self.remote.step(plan)
        return self.run(plan, timer), rows

    def run(self, plan: StepPlan, timer: StepTimer | NoStepTimer = NO_STEP_TIMER) -> torch.Tensor:
        """Hidden states `[T, hidden]` of a step on this rank."""
        packed = torch.tensor(plan.packed, dtype=torch.int32)
        if self._pinned:
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True)
        t, s = plan.num_tokens, plan.num_seqs
        if (
            not plan.num_prefill
            and not plan.capture
            and self.decode_graphs is not None
            and s <= self.decode_graphs.max_batch
        ):
            timer.mark("prepare")
            return self.decode_graphs.run(packed, s)
        meta = build_metadata(
            self.kv.tables,
            self.kv.block_size,
            packed[t:].view(3, s),
            num_prefill=plan.num_prefill,
            num_prefill_tokens=plan.num_prefill_tokens,
            num_tokens=t,
            width=max(plan.width, 1),
            max_seqlen=plan.max_seqlen,
            has_cache=plan.has_cache,
            all_full=plan.all_full,
            self_visible=plan.self_visible,
        )
        if plan.capture:
            rows = [i for _, first, n, _ in plan.capture for i in range(first, first + n)]
            meta.capture = CaptureMeta(rows=torch.tensor(rows).to(self.device, non_blocking=True))
        timer.mark("prepare")
        hidden = self.model(packed[:t], meta, self.kv.buffers)
        if meta.capture is not None:
            self._keep_capture(plan, meta.capture)
        return hidden

    def _keep_capture(self, plan: StepPlan, capture: CaptureMeta) -> None:
        at = 0
        for row, _, n, starts in plan.capture:
            qs = [q[at : at + n] for q in capture.q]
            outs = [o[at : at + n] for o in capture.out]
            if not starts and row in self.captured:
                old_q, old_out = self.captured[row]
                qs = [torch.cat([a, b]) for a, b in zip(old_q, qs)]
                outs = [torch.cat([a, b]) for a, b in zip(old_out, outs)]
            self.captured[row] = (qs, outs)
            at += n

    def selection_inputs(self, row: int, prompt_len: int, with_outputs: bool):
        """This rank's part of the end-of-prompt selection of the request in table `row`:
        middle-token scores `[L, Hkv_local, P]` of its heads (from the kept queries and the
        prompt's keys in its pool), and the kept attention outputs `[L, W, Hq_local, D]`
        when a dynamic plan needs them; both on the host. Forgets the kept tensors."""
        qs, outs = self.captured.pop(row)
        w = qs[0].shape[0]
        tables, buffers, bs = self.kv.tables, self.kv.buffers, self.kv.block_size
        nb = -(-prompt_len // bs)
        # pending heads are positional: their first nb entries are the prompt's blocks
        ids = tables.dev[:, row, :, :nb].long()  # [L, k, nb]
        q_pos = torch.arange(prompt_len - w, prompt_len, device=buffers.k.device)
        scale = buffers.k.shape[-1] ** -0.5
        scores = []
        for layer in range(ids.shape[0]):
            k = buffers.k[ids[layer]].reshape(ids.shape[1], nb * bs, -1)[:, :prompt_len]
            scores.append(middle_scores(qs[layer], q_pos, k.transpose(0, 1), scale))
        # one transfer for all layers
        return torch.stack(scores).cpu(), torch.stack(outs).cpu() if with_outputs else None


def plan_step(scheduled: list[tuple[Sequence, int]], capture_window: dict[str, int]) -> tuple[StepPlan, list[StepRows]]:
    """The step's plan (prefill chunks first, then decode tokens) and where each sequence's
    rows are in its hidden states."""
    prefill = [(s, n) for s, n in scheduled if n > 1]
    decode = [(s, n) for s, n in scheduled if n == 1]
    ids: list[int] = []
    rows: list[StepRows] = []
    capture: list[tuple[int, int, int, bool]] = []
    info: list[list[int]] = [[], [], []]  # table row, first position, token count per sequence
    width = max_seqlen = 0
    has_cache, all_full, self_visible = False, True, True
    for i, (seq, n) in enumerate(prefill + decode):
        tables = seq.kv
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        rows.append(StepRows(seq, start, end, len(ids)))
        w = capture_window.get(seq.request_id)
        if w:
            lo = max(start, seq.num_prompt_tokens - w)
            hi = min(end, seq.num_prompt_tokens)
            if hi > lo:
                capture.append((tables.row, len(ids) + lo - start, hi - lo, lo == max(0, seq.num_prompt_tokens - w)))
        ids.extend(seq.all_token_ids[start:end])
        info[0].append(tables.row)
        info[1].append(start)
        info[2].append(n)
        width = max(width, int(tables.nent.max()))
        if i < len(prefill):
            max_seqlen = max(max_seqlen, n)
            has_cache |= start > 0
            all_full &= tables.all_unbounded
            self_visible &= tables.min_recent() >= 1
    plan = StepPlan(
        ids + info[0] + info[1] + info[2],
        len(ids),
        len(info[0]),
        len(prefill),
        sum(n for _, n in prefill),
        width,
        max_seqlen,
        has_cache,
        all_full,
        self_visible,
        capture,
    )
    return plan, rows


def rows_of(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`hidden[rows]` for increasing `rows`; the index goes to the device pinned and
    non-blocking, since a blocking copy would wait for the forward to finish."""
    if len(rows) == hidden.shape[0]:  # every row (a decode-only step): no gather
        return hidden
    index = torch.tensor(rows)
    if hidden.is_cuda:
        index = index.pin_memory().to(hidden.device, non_blocking=True)
    return hidden[index]
