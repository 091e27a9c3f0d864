"""Graph-replayed decode equals eager decode token for token on a GPU, for every plan kind,
at padded and unpadded batch sizes, as the batch shrinks and grows (the same schedule as
tests/test_static_decode.py, with the capture)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: the kernels would not be compiled", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from headwise.engine.config import EngineConfig  # noqa: E402
from headwise.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from headwise.engine.llm_engine import LLMEngine  # noqa: E402
from headwise.engine.sampling_params import SamplingParams  # noqa: E402
from tests.tiny_model import PLANS, random_prompts, run_to_end, write_plans, write_tiny_llama  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replayed_decode_equals_eager_for_every_plan(tmp_path, dtype):
    model = write_tiny_llama(tmp_path / "model")
    plans = write_plans(model, tmp_path)
    prompts = random_prompts(11, 200, step=37)
    names = [PLANS[i % len(PLANS)] for i in range(11)]
    params = [SamplingParams(max_tokens=10 + 5 * i, temperature=0, ignore_eos=True, logprobs=0) for i in range(11)]
    outs = {}
    for eager in (True, False):
        eng = LLMEngine(
            EngineConfig(
                model=model,
                plans=plans,
                device="cuda",
                dtype=dtype,
                kv_cache_mb=64,
                max_num_seqs=16,
                max_num_batched_tokens=256,
                enforce_eager=eager,
            )
        )
        assert isinstance(eng.runner.decode_graphs, DecodeGraphs) != eager
        for i in range(9):
            eng.add_request(f"r{i}", prompts[i], params[i], names[i])

        def grow(step: int) -> None:
            if step == 30:  # the batch grows again after shrinking
                for i in (9, 10):
                    eng.add_request(f"r{i}", prompts[i], params[i], names[i])  # noqa: B023

        done = run_to_end(eng, grow)
        assert eng.block_census()["held"] == 0
        if not eager:
            runs = eng.runner.decode_graphs.runs
            assert any(n < size for n, size in runs) and any(n == size for n, size in runs), runs
        outs[eager] = done
    for rid, out in outs[True].items():
        assert outs[False][rid].token_ids == out.token_ids, rid
