"""A scheduler and KV manager on a fake model shape, without weights (vLLM's
`create_scheduler()` style): 2 layers x 2 KV heads, blocks of 4 tokens, a pool of a few
dozen blocks. Steps are closed here as LLMEngine closes them, with a fixed sampled token
instead of a forward pass, so each rule of admission, growth, preemption, window release,
compaction and prefix hits is checked in milliseconds."""

from __future__ import annotations

import numpy as np
import torch

from headwise.engine.block_names import name_seed
from headwise.engine.sampling_params import SamplingParams
from headwise.engine.scheduler import Scheduler, SchedulerOutput
from headwise.engine.sequence import Sequence
from headwise.kvcache.budget import FULL_BUDGET, HeadBudget
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.plans import ModelShape, full_plan

LAYERS, KV_HEADS, BLOCK = 2, 2, 4
HEADS = LAYERS * KV_HEADS
SHAPE = ModelShape(LAYERS, KV_HEADS, KV_HEADS, 2, "fake")
SAMPLED = 7  # the token every step "samples"


def create_scheduler(
    num_blocks: int = 40, max_num_seqs: int = 4, max_num_batched_tokens: int = 16, prefix_caching: bool = False
) -> Scheduler:
    kv = KVCacheManager(
        LAYERS,
        KV_HEADS,
        SHAPE.head_dim,
        BLOCK,
        num_blocks,
        max_model_len=64,
        dtype=torch.float32,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching,
    )
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens)


def make_seq(
    rid: str,
    prompt_len: int,
    max_tokens: int = 8,
    budget: HeadBudget = FULL_BUDGET,
    selecting: bool = False,
    arrival: float = 0.0,
    first_token: int = 100,
) -> Sequence:
    """A request whose every head has `budget` (`selecting`: they decide at the end of the prompt)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompt = list(range(first_token, first_token + prompt_len))
    seq = Sequence(rid, prompt, params, full_plan(SHAPE), torch.Generator(), arrival_time=arrival)
    seq.budgets = [[budget] * KV_HEADS for _ in range(LAYERS)]
    seq.pending_heads = np.full((LAYERS, KV_HEADS), selecting)
    seq.hash_seed = name_seed(seq, SHAPE.id, "float32", BLOCK)
    return seq


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule, "compute" every scheduled token, close the step as LLMEngine._step does:
    progress and window release, compaction at the end of a selecting prompt (random
    scores), a sampled token for each request whose tokens are all computed."""
    out = scheduler.schedule()
    for seq, n in out.scheduled:
        end = seq.num_computed_tokens + n
        scheduler.record_written(seq, end)
        if seq.needs_selection() and end >= seq.num_prompt_tokens:
            scores = [torch.randn(KV_HEADS, seq.num_prompt_tokens) for _ in range(LAYERS)]
            scheduler.kv_manager.compact(seq.kv, torch.zeros(LAYERS, KV_HEADS, dtype=torch.bool), scores)
            seq.cacheable = False
        if end == seq.num_tokens:
            seq.output_token_ids.append(SAMPLED)
    return out


def held(seq: Sequence) -> int:
    return seq.kv.num_blocks_held if seq.has_kv else 0
