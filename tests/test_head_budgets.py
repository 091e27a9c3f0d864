"""Per-head budgets: the paged engine equals dense attention with the docs/design.md mask for
window, elastic, select and dynamic plans, in prefill, chunked prefill and 48 decode
steps (ring wrap-around, GQA 9:3), whatever the chunk size. On a tiny random Llama with the
default model's head counts (tests/tiny_model.py): the mask contract does not depend on the
weights, and 4 small layers run it in seconds instead of minutes."""

from __future__ import annotations

import pytest
import torch

from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.plans import FULL, DynamicSpec, HeadSpec, Plan, save_plan
from tests.dense_reference import dense_logprobs
from tests.tiny_model import random_prompts, write_tiny_llama

PROMPT_LEN = 150
DECODE = 48  # three turns of a select head's 16-slot ring; a window head's 32 tokens move on 48
LOGPROB_ATOL = 2e-3  # fp32 paged vs dense; observed differences ~1e-5


def _mixed(shape, spec: HeadSpec) -> list[list[HeadSpec]]:
    # head (layer + kv_head) % 3 == 0 stays full, the others get `spec`
    return [[FULL if (l + h) % 3 == 0 else spec for h in range(shape.kv_heads)] for l in range(shape.layers)]


def _plans(shape) -> dict[str, Plan]:
    return {
        "window": Plan("window", shape, _mixed(shape, HeadSpec("window", sink=4, recent=32))),
        "elastic": Plan("elastic", shape, _mixed(shape, HeadSpec("elastic", sink=4, alpha=8, beta=0.15))),
        "select": Plan("select", shape, _mixed(shape, HeadSpec("select", sink=4, recent=16, select=16, window=8))),
        "dynamic": Plan(
            "dynamic",
            shape,
            [[FULL] * shape.kv_heads for _ in range(shape.layers)],
            dynamic=DynamicSpec(0.34, HeadSpec("select", sink=4, recent=16, select=16, window=8)),
        ),
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny93"), heads=9, kv_heads=3)


@pytest.fixture(scope="module")
def engine(make_engine, tiny_dir):
    return make_engine(model=tiny_dir, kv_cache_mb=32)


@pytest.fixture(scope="module")
def plan_engines(make_engine, engine, tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    plans = _plans(engine.model_config.shape)
    paths = {}
    for name, plan in plans.items():
        save_plan(plan, d / f"{name}.json")
        paths[name] = str(d / f"{name}.json")
    # select heads on the whole-prompt path (select_margin 0): the mask contract at any chunk size;
    # the bounded path equals it in one chunk (test_bounded_select_in_one_chunk_equals_dense_masked_attention)
    engines = {
        chunk: make_engine(model=tiny_dir, kv_cache_mb=32, plans=paths, max_num_batched_tokens=chunk, select_margin=0)
        for chunk in (16, 64, 4096)
    }
    return plans, engines


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return random_prompts(1, PROMPT_LEN)[0]


@pytest.mark.parametrize("name", ["window", "elastic", "select", "dynamic"])
def test_engine_equals_dense_masked_attention(plan_engines, engine, prompt, name):
    plans, engines = plan_engines
    params = SamplingParams(max_tokens=DECODE, temperature=0, ignore_eos=True, logprobs=1)
    outs = {chunk: eng.generate([prompt], params, name)[0] for chunk, eng in engines.items()}
    ref = outs[4096]
    for chunk, out in outs.items():  # chunk size never changes a bounded head's output
        assert out.token_ids == ref.token_ids, f"chunk {chunk}"
    tokens = prompt + ref.token_ids
    dense = dense_logprobs(engine, plans[name], tokens, PROMPT_LEN, DECODE)
    rows = torch.arange(PROMPT_LEN - 1, len(tokens) - 1)
    assert dense[rows].argmax(-1).tolist() == ref.token_ids
    ours = torch.tensor([lp.logprob for lp in ref.logprobs])
    torch.testing.assert_close(ours, dense[rows, torch.tensor(ref.token_ids)], atol=LOGPROB_ATOL, rtol=0)
    full = engines[4096].generate([prompt], params, "full")[0]
    assert ref.kv_bytes_decode < full.kv_bytes_decode
    if name != "dynamic":  # a dynamic plan holds the whole prompt in every head until it ends
        assert ref.kv_bytes < full.kv_bytes


def test_bounded_select_in_one_chunk_equals_dense_masked_attention(plan_engines, make_engine, tiny_dir, prompt):
    """The bounded prefill (select_margin 2: 4 + 32 + 16 slots per select head, never the
    150-token prompt) keeps what the whole-prompt path keeps when the prompt is one chunk:
    the same tokens and log-probabilities as the dense reference's engine, in less memory."""
    plans, engines = plan_engines
    params = SamplingParams(max_tokens=DECODE, temperature=0, ignore_eos=True, logprobs=1)
    ref = engines[4096].generate([prompt], params, "select")[0]
    bounded = make_engine(
        model=tiny_dir, kv_cache_mb=32, plans=engines[4096].config.plans, max_num_batched_tokens=4096, select_margin=2.0
    )
    out = bounded.generate([prompt], params, "select")[0]
    assert out.token_ids == ref.token_ids
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in out.logprobs]),
        torch.tensor([lp.logprob for lp in ref.logprobs]),
        atol=1e-4,
        rtol=0,
    )
    assert out.kv_bytes < ref.kv_bytes and out.kv_bytes_decode == ref.kv_bytes_decode
