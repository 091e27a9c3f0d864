"""A request inside the engine: its tokens, progress, cache state and outputs."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from headwise.engine.outputs import TokenLogprob
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.budget import HeadBudget
from headwise.kvcache.head_tables import HeadTables
from headwise.kvcache.plans import Plan
from headwise.kvcache.prefill_selection import BoundedPrefill

if TYPE_CHECKING:
    from headwise.engine.structured_output import GrammarState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    plan: Plan
    generator: torch.Generator
    # the plan resolved for this request once, when it is added, in the tables' column order:
    # each head's budget and the heads that decide at the end of the prompt (select, dynamic)
    budgets: list[list[HeadBudget]] = field(default_factory=list)
    pending_heads: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    _kv: HeadTables | None = field(default=None, repr=False)  # set by admission, cleared when freed
    finish_reason: str | None = None
    error: str | None = None  # set with finish_reason "error" (LLMEngine.fail_request)
    stop_reason: str | int | None = None
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    peak_blocks: int = 0
    decode_peak_blocks: int = 0  # most blocks held at a sampled token (prompt done)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # incremental detokenization offsets (vLLM's scheme)
    prefix_offset: int = 0
    read_offset: int = 0
    prefix_text: str = ""  # decoded ids[prefix_offset:read_offset]
    # prefix caching: the chain root, names of the whole blocks so far, how many are
    # registered, whether new blocks are cacheable, and the prompt tokens a hit served
    hash_seed: int = 0
    block_hashes: list[int] = field(default_factory=list)
    num_registered: int = 0
    cacheable: bool = True
    num_cached_tokens: int | None = None
    # the last prompt positions whose queries / outputs the select heads score (0: none)
    probe_window: int = 0
    # the select heads that prefill with a bounded peak (kvcache/prefill_selection.py), or None
    bounded: BoundedPrefill | None = None
    # the next exponential draw of a non-greedy request, in flight (engine.sampler)
    noise: Future | None = None
    # constrained decoding: the grammar's compile, then its matcher (engine.structured_output)
    grammar: GrammarState | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def context_len(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last sampled token is missing from the cache."""
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_token_ids

    @property
    def grammar_ready(self) -> bool:
        """No grammar, or its compile has ended: admission may take the request."""
        return self.grammar is None or self.grammar.ready()

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def kv(self) -> HeadTables:
        """This request's KV state (block tables, ring params, reserves): only while it holds blocks."""
        if self._kv is None:
            raise RuntimeError(f"request {self.request_id!r} holds no KV state (waiting or finished)")
        return self._kv

    @kv.setter
    def kv(self, value: HeadTables | None) -> None:
        self._kv = value

    @property
    def num_computed_tokens(self) -> int:
        """Positions whose K/V are in the cache: the tables' count (the KV manager's), 0
        without tables (waiting, preempted, finished)."""
        return self._kv.num_tokens if self._kv is not None else 0

    @property
    def has_kv(self) -> bool:
        return self._kv is not None

    def needs_selection(self) -> bool:
        return self._kv is not None and bool(self._kv.pending.any())

    def selects_in_forward(self) -> bool:
        """Whether its bounded select heads still choose what they keep in each chunk's forward."""
        return self.bounded is not None and self._kv is not None and bool((self._kv.pending & self._kv.bounded).any())
