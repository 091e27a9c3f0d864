"""Tensor parallelism on the CPU (gloo, worker processes): the same greedy tokens as one
rank for every plan kind, logprobs within 1e-4; head-balanced sharding (a permutation of
the heads) leaves the outputs unchanged and spreads a planted plan's full heads over the
ranks' pools; a worker that dies fails the engine instead of hanging it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams
from headwise.engine.tp_workers import WorkerDied
from headwise.kvcache.plans import FULL, HeadSpec, Plan, save_plan
from headwise.kvcache.sharding import ShardingError
from tests.tiny_model import PLANS, random_prompts, run_to_end, write_plans, write_tiny_llama

ATOL = 1e-4
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


def _run(model: str, plans: dict[str, str], tp: int, names: list[str], prompts: list[list[int]], **kw):
    kw.setdefault("kv_cache_mb", 8)
    eng = LLMEngine(EngineConfig(model=model, plans=plans, max_num_batched_tokens=48, tensor_parallel_size=tp, **kw))
    try:
        outs = eng.generate(prompts, PARAMS, names)
        assert eng.block_census()["held"] == 0
        return outs
    finally:
        eng.close()


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids, x.plan
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in x.logprobs]),
            torch.tensor([lp.logprob for lp in y.logprobs]),
            atol=ATOL,
            rtol=0,
        )


@pytest.mark.parametrize("tp, kv_heads", [(2, 2), (3, 6)])
def test_tensor_parallel_equals_one_rank_for_every_plan_kind(tmp_path, tp, kv_heads):
    """2 ranks of a model with 2 KV heads, 3 of one with 6: every plan kind in one batch,
    chunked prefill, select heads compacting on every rank, a dynamic plan's choices."""
    model = write_tiny_llama(tmp_path / "model", heads=2 * kv_heads, kv_heads=kv_heads, intermediate=576)
    plans = write_plans(model, tmp_path)
    prompts = random_prompts(len(PLANS), 70, step=13)
    _assert_same(_run(model, plans, tp, PLANS, prompts), _run(model, plans, 1, PLANS, prompts))


def _run_with_rank_peaks(eng: LLMEngine, prompts, plan: str) -> tuple[list[int], list]:
    """Run the requests to the end: the most blocks each rank's pool held meanwhile, and their outputs."""
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, PARAMS, plan)
    pool = eng.kv_manager.pool
    peak = np.zeros(eng.kv_manager.ranks, dtype=np.int64)

    def track(_step: int) -> None:
        np.maximum(peak, pool.blocks_per_rank - pool.num_free_per_rank, out=peak)

    done = run_to_end(eng, track)
    return peak.tolist(), [done[f"r{i}"] for i in range(len(prompts))]


def test_balanced_sharding_spreads_a_planted_plans_full_heads(tmp_path):
    """Heads 0 and 1 of every layer full, the other four 16-token windows: contiguous
    sharding (the engine's default plan is full) puts every full head on rank 0; balanced
    (the planted plan is the default) gives each of 3 ranks the same share, same tokens."""
    model = write_tiny_llama(tmp_path / "model", heads=12, kv_heads=6, intermediate=576)
    shape = LLMEngine(EngineConfig(model=model, kv_cache_mb=4)).model_config.shape
    window = HeadSpec("window", sink=4, recent=12)
    plan = Plan("planted", shape, [[FULL if h < 2 else window for h in range(6)] for _ in range(shape.layers)])
    save_plan(plan, tmp_path / "planted.json")
    plans = {"planted": str(tmp_path / "planted.json")}
    prompts = random_prompts(3, 200, step=5)
    names = ["planted"] * 3
    peaks, outs = {}, {}
    for sharding, default in (("contiguous", "full"), ("balanced", "planted")):
        eng = LLMEngine(
            EngineConfig(
                model=model,
                plans=plans,
                default_plan=default,
                kv_cache_mb=8,
                max_num_batched_tokens=256,
                tensor_parallel_size=3,
            )
        )
        try:
            assert eng.sharding.is_contiguous == (sharding == "contiguous")
            peaks[sharding], outs[sharding] = _run_with_rank_peaks(eng, prompts, "planted")
        finally:
            eng.close()
    _assert_same(outs["balanced"], outs["contiguous"])
    _assert_same(outs["balanced"], _run(model, plans, 1, names, prompts))
    contiguous, balanced = peaks["contiguous"], peaks["balanced"]
    # 3 requests x 4 layers: contiguous rank 0 holds 2 full heads, ranks 1-2 two windows each
    assert contiguous[0] > 3 * contiguous[1] and contiguous[1] == contiguous[2]
    assert max(balanced) <= 1.1 * (sum(balanced) / 3)
    assert max(balanced) < max(contiguous)


def test_heads_that_do_not_divide_are_refused_before_any_worker_starts(tmp_path):
    model = write_tiny_llama(tmp_path / "model")  # 2 KV heads
    with pytest.raises(ShardingError, match="2 KV heads and 6 query heads per layer must both divide by it"):
        LLMEngine(EngineConfig(model=model, kv_cache_mb=4, tensor_parallel_size=3))


def test_a_dead_worker_fails_the_engine_instead_of_hanging(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    eng = LLMEngine(EngineConfig(model=model, kv_cache_mb=4, tensor_parallel_size=2))
    try:
        eng.generate(random_prompts(1, 20), PARAMS)
        eng.workers.processes[0].kill()
        eng.workers.processes[0].join(timeout=10)
        start = time.monotonic()
        with pytest.raises(WorkerDied, match="tensor-parallel worker rank 1 exited"):
            eng.generate(random_prompts(1, 20), PARAMS)
        assert time.monotonic() - start < 10
    finally:
        eng.close()


def test_torchrun_style_ranks_on_localhost_give_the_tokens_of_one_rank(tmp_path):
    """Two processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK), each running the same `headwise generate`: rank 1 serves rank
    0's engine, rank 0 prints the output, equal to a one-rank run's."""
    import json
    import os
    import subprocess
    import sys

    from headwise.engine.distributed import free_port

    model = write_tiny_llama(tmp_path / "model")
    prompt = " ".join(f"w{i}" for i in range(3, 60, 2))
    argv = [
        sys.executable,
        "-m",
        "headwise.clients.cli",
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-tokens",
        "8",
        "--json",
        "--kv-cache-mb",
        "4",
        "--tensor-parallel-size",
        "2",
    ]
    port = str(free_port())
    procs = []
    for rank in (1, 0):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out0, err0 = procs[1].communicate(timeout=300)
    procs[0].communicate(timeout=60)
    assert procs[1].returncode == 0 and procs[0].returncode == 0, err0[-2000:]
    one = subprocess.run(
        [*argv[:-1], "1"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert json.loads(out0.splitlines()[-1])["token_ids"] == json.loads(one.stdout.splitlines()[-1])["token_ids"]


@pytest.mark.slow
def test_default_model_three_ranks_equal_one_for_every_plan_kind(tmp_path, tok):
    """The issue's exactness target: SmolLM2 (3 KV heads) over 3 ranks, fp32, every plan
    kind: the same greedy tokens as one rank, logprobs within 1e-4 (~4 min on 2 cores)."""
    from headwise.kvcache.plan_build import dynamic_plan, select_plan, streaming_plan
    from headwise.kvcache.plans import ModelShape

    shape = ModelShape(30, 3, 9, 64, "smollm2-135m")
    elastic = Plan(
        "elastic",
        shape,
        [
            [FULL if (l + h) % 3 == 0 else HeadSpec("elastic", sink=16, alpha=32, beta=0.1) for h in range(3)]
            for l in range(30)
        ],
    )
    plans = {
        "window": streaming_plan(shape, 16, 64),
        "elastic": elastic,
        "select": select_plan(shape, 16, 32, 32, 16),
        "dynamic": dynamic_plan(shape, 0.34, 16, 32, 32, 16),
    }
    paths = {}
    for name, plan in plans.items():
        save_plan(plan, tmp_path / f"{name}.json")
        paths[name] = str(tmp_path / f"{name}.json")
    text = "The lighthouse keeper counted the ships that passed the rocky cape every evening. "
    prompts = [tok(text * (8 + i))["input_ids"] for i in range(5)]
    names = ["full", *paths]
    _assert_same(
        _run("smollm2-135m", paths, 3, names, prompts, kv_cache_mb=128),
        _run("smollm2-135m", paths, 1, names, prompts, kv_cache_mb=128),
    )
