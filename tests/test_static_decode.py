"""The padded static-buffer decode path (what CUDA graphs capture) equals the eager path
token for token, for every plan kind, as the batch shrinks and grows; the capture itself
is checked on a GPU by tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import torch

from headwise.engine.config import EngineConfig
from headwise.engine.cuda_graphs import capture_sizes
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams
from tests.tiny_model import PLANS, random_prompts, run_to_end, write_plans, write_tiny_llama

# a padded batch multiplies more rows than the eager one, and on the CPU the row count picks
# the kernel (MKL's, and LlamaModel.logits' three products): fp32 rounding differs, measured
# up to 1.1e-5 in a logprob of the tiny model's wide logits
LOGPROB_ATOL = 5e-5


def test_capture_sizes_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_padded_static_decode_equals_eager_for_every_plan(tmp_path):
    model = write_tiny_llama(tmp_path / "model")
    plans = write_plans(model, tmp_path)
    # 7 requests of different lengths and output counts: decode batches of 7 down to 1
    # (padded to 8, 4, 2, 1), with a late arrival growing the batch again
    prompts = random_prompts(7, 30, step=11)
    names = [PLANS[i % len(PLANS)] for i in range(7)]
    params = [SamplingParams(max_tokens=6 + 4 * i, temperature=0, ignore_eos=True, logprobs=0) for i in range(7)]
    outs = {}
    for static in (False, True):
        eng = LLMEngine(
            EngineConfig(model=model, plans=plans, kv_cache_mb=16, max_num_seqs=8, max_num_batched_tokens=64)
        )
        if static:
            eng.runner.capture_decode(8, capture=False)
        for i in range(6):
            eng.add_request(f"r{i}", prompts[i], params[i], names[i])

        def late_arrival(step: int) -> None:
            if step == 20:
                eng.add_request("r6", prompts[6], params[6], names[6])  # noqa: B023

        done = run_to_end(eng, late_arrival)
        assert eng.block_census()["held"] == 0
        if static:  # padded (5 -> 8, 3 -> 4) and exact sizes ran as the batch changed
            runs = eng.runner.decode_graphs.runs
            assert any(n < size for n, size in runs) and any(n == size for n, size in runs), runs
            assert len({size for _, size in runs}) >= 3, runs
        outs[static] = done
    for rid, out in outs[False].items():
        assert outs[True][rid].token_ids == out.token_ids, rid
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in outs[True][rid].logprobs]),
            torch.tensor([lp.logprob for lp in out.logprobs]),
            atol=LOGPROB_ATOL,
            rtol=0,
        )
