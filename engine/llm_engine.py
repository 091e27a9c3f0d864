"""The synchronous engine: add requests, step, collect outputs."""

from __future__ import annotations

import atexit
import time
from multiprocessing.process import BaseProcess

import torch

from headwise.engine.block_names import name_seed
from headwise.engine.chat import encode_chat, eos_token_ids
from headwise.engine.config import DEFAULT_KV_CACHE_MB, EngineConfig
from headwise.engine.detokenizer import Detokenizer
from headwise.engine.distributed import TPGroup
from headwise.engine.engine_stats import EngineStats, collect_stats
from headwise.engine.errors import PromptTooLong, UnknownPlan
from headwise.engine.generate import generate_all
from headwise.engine.head_selection import select_and_compact
from headwise.engine.loader import ModelConfig, model_id, read_config, resolve_model_dir
from headwise.engine.model import Shard
from headwise.engine.model_runner import ModelRunner, rows_of
from headwise.engine.outputs import RequestOutput, TokenLogprob
from headwise.engine.prompt_logprobs import extend_prompt_logprobs
from headwise.engine.request_guard import RequestGuard, isolate_rows
from headwise.engine.request_output import kv_bytes_saved, request_output
from headwise.engine.request_plan import check_fits, resolve_plan
from headwise.engine.sampler import Sampler
from headwise.engine.sampling_params import InvalidRequest, SamplingParams, check_prompt_ids
from headwise.engine.scheduler import Scheduler
from headwise.engine.sequence import Sequence, Status
from headwise.engine.step_timer import NO_STEP_TIMER, NoStepTimer, StepTimer
from headwise.engine.stop_rules import finish_reason
from headwise.engine.structured_output import GrammarCompiler, GrammarState
from headwise.engine.tp_workers import RankSetup, TPWorkers
from headwise.engine.tp_workers import start as start_workers
from headwise.engine.weights import load_model
from headwise.kernels.kv_quant import cache_dtype
from headwise.kvcache.kv_scales import rank_scales
from headwise.kvcache.manager import KVCacheManager
from headwise.kvcache.plans import Plan, load_plans
from headwise.kvcache.sharding import Sharding, for_default_plan


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_id = model_id(config.model)
        self.dtype = getattr(torch, config.dtype)
        model_dir = resolve_model_dir(config.model)
        self.model_dir = model_dir  # the server reads generation_config.json from it
        mc = read_config(model_dir, self.model_id)
        self.plans: dict[str, Plan] = load_plans(config.plans, mc.shape)
        if config.default_plan not in self.plans:
            raise ValueError(f"default plan {config.default_plan!r} is not loaded (loaded: {', '.join(self.plans)})")
        self.default_plan = config.default_plan
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        # the pool's element dtype: the model's, or fp8 (1 byte per K / V element)
        self.kv_dtype = cache_dtype(config.kv_cache_dtype, self.dtype)
        per_block = KVCacheManager.bytes_per_block(config.block_size, mc.head_dim, self.kv_dtype)
        # with tensor parallelism: per rank (each rank's device holds its heads' pool)
        num_blocks = config.num_blocks or int((config.kv_cache_mb or DEFAULT_KV_CACHE_MB) * 2**20 // per_block)
        tp = config.tensor_parallel_size
        self.sharding = for_default_plan(self.plans[self.default_plan], tp, self.max_model_len, config.block_size)
        self.workers: TPWorkers | None = None
        group: TPGroup | None = None
        processes: list[BaseProcess] = []
        shard: Shard | None = None
        if tp > 1:
            group, processes = start_workers(config, RankSetup(self.sharding.order, num_blocks, self.max_model_len))
            shard = Shard(0, tp, tuple(map(tuple, self.sharding.heads_of(0))))
        device = str(group.device) if group is not None else config.device
        self.model_config, self.model, self.tokenizer = load_model(
            config.model, config.dtype, device, config.load_format, shard, group
        )
        self.device = device
        self.kv_manager = _kv_manager(config, mc, num_blocks, self.max_model_len, self.kv_dtype, device, self.sharding)
        if group is not None:
            self.workers = TPWorkers(group, self.kv_manager, processes)
            atexit.register(self.close)
        self.eos_ids = eos_token_ids(mc.eos_token_ids, self.tokenizer)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_manager.worker_view(), device)
        self.runner.remote = self.workers
        if torch.device(device).type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode(config.max_num_seqs)
        self.detok = Detokenizer(self.tokenizer)
        self.sampler = Sampler(mc.vocab_size, self.eos_ids, device)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, self.eos_ids)
        self._seqs: dict[str, Sequence] = {}
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self.kv_bytes_saved = 0
        # finished outside sampling (aborted, failed): their final outputs go out with the next step
        self._ended: list[Sequence] = []
        # opt-in per-phase timing of step() (engine/step_timer.py); off, a step pays nothing for it
        self.record_step_timings = False
        self.step_timings: dict[str, float] = {}

    # -- requests --------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        plan: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self._seqs:
            raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
        check_prompt_ids(prompt_token_ids, self.model_config.vocab_size)
        params.check_vocab(self.model_config.vocab_size)
        name = plan or self.default_plan
        if name not in self.plans:
            raise UnknownPlan(f"plan {name!r} is not loaded (loaded: {', '.join(self.plans)})", "kv_plan")
        self.check_context(len(prompt_token_ids), params.max_tokens)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        seq = Sequence(
            request_id, list(prompt_token_ids), params, self.plans[name], torch.Generator().manual_seed(seed)
        )
        resolve_plan(seq, self.sharding, self.config.select_margin)
        if self.config.enable_prefix_caching:
            seq.hash_seed = name_seed(seq, self.model_id, _cache_numbers(self.config), self.kv_manager.block_size)
        if params.grammar is not None:
            seq.grammar = GrammarState(self.grammars.compile(params.grammar), self.eos_ids)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        c, kv = self.config, self.kv_manager
        check_fits(seq, self.sharding, kv.block_size, kv.num_blocks, c.max_num_batched_tokens, c.select_margin)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        """PromptTooLong unless the prompt and the completion fit in max_model_len; the
        server calls it too, before a huge prompt travels to the engine thread."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{total} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). Please "
                "reduce the prompt or max_tokens.",
                "max_tokens",
            )

    def abort_request(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
            seq.finished_time = time.monotonic()
            self._ended.append(seq)

    def fail_request(self, request_id: str, error: BaseException) -> None:
        """Finish a request whose own processing raised: finish_reason "error", its blocks
        freed, and a final output carrying `error` among the step's outputs. The other
        requests go on; a request that already ended is left as it is."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._fail(seq, error)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if any(s is seq for s in self._ended):
            return
        if not seq.finished:
            self.scheduler.abort(seq.request_id)
        # a request that finished in this step before the fault has freed its blocks already
        seq.status = Status.FINISHED
        seq.finish_reason = "error"
        seq.stop_reason = None
        seq.error = f"{type(error).__name__}: {error}"
        seq.finished_time = time.monotonic()
        self._ended.append(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def kv_blocks_in_use(self, request_id: str) -> int:
        seq = self._seqs.get(request_id)
        return seq.kv.num_blocks_held if seq is not None and seq.has_kv else 0

    def close(self) -> None:
        """Stop the tensor-parallel workers (idempotent; nothing to do with one rank)."""
        if self.workers is not None:
            workers, self.workers = self.workers, None
            self.runner.remote = None
            workers.shutdown()

    def block_census(self) -> dict[str, int]:
        """Held / evictable / free block counts, checked against every live request's
        tables (an AssertionError names what leaked)."""
        return self.kv_manager.census([s.kv for s in self._seqs.values() if s.has_kv])

    def stats(self) -> EngineStats:
        return collect_stats(self.scheduler, self.kv_bytes_saved)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
    ) -> list[int]:
        """The chat template's token ids; `continue_final_message` leaves the last message
        open (no end-of-turn after it) so generation continues it, as vLLM does; `tools`
        and tool turns render through a tool-aware template (engine/chat.py)."""
        return encode_chat(
            self.tokenizer, messages, add_generation_prompt, continue_final_message, tools, chat_template
        )

    # -- prefix caching --------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (vLLM's reset_prefix_cache)."""
        if self.kv_manager.prefix_cache is not None:
            self.kv_manager.prefix_cache.reset()

    # -- the step --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduled batch. An exception in per-request work (under `guard`) fails that
        request alone (fail_request); one in the batched forward pass propagates: the
        engine is then in an unknown state and its owner must stop it. Under tensor
        parallelism a collective that breaks because a worker died raises WorkerDied."""
        try:
            if not self.record_step_timings:
                return self._step(NO_STEP_TIMER)
            timer = StepTimer(self.config.device)
            outputs = self._step(timer)
            timer.mark("postprocess")
            self.step_timings = timer.timings
            return outputs
        except Exception as error:
            if self.workers is not None:
                self.workers.raise_if_dead(error)
            raise

    def _step(self, timer: StepTimer | NoStepTimer) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        timer.mark("schedule")
        outputs = self._take_ended()
        if not sched.scheduled:
            return outputs
        timer.mark("postprocess")
        now = time.monotonic()
        guard = RequestGuard(self._fail)
        # bounded select heads keep their window queries themselves (ModelRunner.window_q)
        windows = {
            s.request_id: s.probe_window
            for s, _ in sched.scheduled
            if s.probe_window and s.needs_selection() and s.bounded is None
        }
        self.sampler.prefetch_noise(s for s, _ in sched.scheduled)  # drawn on the host while the forward runs
        if self.workers is None:  # TPWorkers.step commits and sends every rank its edits
            self.kv_manager.commit_tables()
        hidden, rows = self.runner.execute(sched.scheduled, windows, timer)
        timer.mark("forward")
        sample_rows, sample_seqs, lp_rows = [], [], []
        for r in rows:
            seq = r.seq
            self.scheduler.record_written(seq, r.end)
            if seq.needs_selection() and r.end >= seq.num_prompt_tokens:
                with guard(seq):
                    self._select(seq)
                seq.cacheable = False  # later K/V depends on what the select heads kept
            if seq.params.prompt_logprobs is not None and r.start < seq.num_prompt_tokens:
                lp_rows.append(r)
            if r.end == seq.num_tokens and guard.ok(seq):
                sample_rows.append(r.row + r.end - r.start - 1)
                sample_seqs.append(seq)
        for r in lp_rows:
            with guard(r.seq):
                extend_prompt_logprobs(r, hidden, self.model.logits)
        if sample_seqs:
            timer.mark("postprocess")
            sampled = isolate_rows(lambda ix: self._sample(hidden, sample_rows, sample_seqs, ix), sample_seqs, guard)
            timer.mark("sample")
            for seq, drawn in zip(sample_seqs, sampled):
                if drawn is None or not guard.ok(seq):
                    continue
                with guard(seq):
                    self._append_token(seq, *drawn, now)
                    outputs.append(self._output(seq))
        return outputs + self._take_ended()

    def _sample(
        self, hidden: torch.Tensor, rows: list[int], seqs: list[Sequence], ix: list[int]
    ) -> list[tuple[int, TokenLogprob | None]]:
        """(token, logprob) of the requests `ix` (indexes into `seqs`), from their rows of
        `hidden`; logits are made here, since the sampler edits them in place."""
        logits = self.model.logits(rows_of(hidden, [rows[i] for i in ix]))
        return list(zip(*self.sampler.sample(logits, [seqs[i] for i in ix])))

    def _take_ended(self) -> list[RequestOutput]:
        ended, self._ended = self._ended, []
        return [self._output(s) for s in ended]

    def _select(self, seq: Sequence) -> None:
        """End of the prompt: heads and middle tokens chosen from every rank's kept queries
        and outputs, then the select heads compacted."""
        if seq.bounded is not None:  # the prompt's last chunk chose and wrote what the heads keep
            self.kv_manager.finish_bounded(seq.kv)
            return
        row, p, with_outputs = seq.kv.row, seq.num_prompt_tokens, seq.plan.dynamic is not None
        if self.workers is None:
            scores, outputs = self.runner.selection_inputs(row, p, with_outputs)
        else:
            scores, outputs = self.workers.select(row, p, with_outputs, self.runner)
        select_and_compact(seq, self.kv_manager, scores, outputs)

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        if seq.has_kv:
            seq.decode_peak_blocks = max(seq.decode_peak_blocks, seq.kv.num_blocks_held)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        seq.output_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprob is not None:
            seq.logprobs.append(logprob)
        new_chars = self.detok.update(seq)
        reason = finish_reason(seq, token, new_chars, self.detok, self.eos_ids, self.max_model_len)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason
            seq.finished_time = time.monotonic()
            self.scheduler.finish(seq)
            self.kv_bytes_saved += kv_bytes_saved(seq, self.kv_manager)

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.finished:
            self._seqs.pop(seq.request_id, None)
        return request_output(seq, self.kv_manager.block_bytes)

    # -- convenience -----------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        plans: list[str] | str | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run prompts to completion together; outputs in input order."""
        return generate_all(self, prompts, params, plans, use_tqdm)


def _cache_numbers(config: EngineConfig) -> str:
    """What decides the numbers a cached block holds besides its tokens and the plan: the
    model's dtype and, when it is 8-bit, the cache's (part of the prefix-cache hash root)."""
    return config.dtype if config.kv_cache_dtype == "auto" else f"{config.dtype}/kv-{config.kv_cache_dtype}"


def _kv_manager(
    config: EngineConfig,
    mc: ModelConfig,
    num_blocks: int,
    max_model_len: int,
    kv_dtype: torch.dtype,
    device: str,
    sharding: Sharding,
) -> KVCacheManager:
    """The KV cache of this process: rank 0's pool tensors (its heads' fp8 scales, from
    --kv-scales or calibrated) and every rank's books."""
    tp = config.tensor_parallel_size
    return KVCacheManager(
        mc.num_layers,
        mc.num_kv_heads,
        mc.head_dim,
        config.block_size,
        num_blocks,
        max_model_len,
        kv_dtype,
        device,
        config.max_num_seqs,
        config.enable_prefix_caching,
        tp,
        rank_scales(config.kv_scales, mc.num_layers, mc.num_kv_heads, sharding.order, 0, tp),
    )
