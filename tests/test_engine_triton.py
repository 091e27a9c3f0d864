"""The engine on the Triton kernels (interpreted on the CPU) equals the engine on the torch
references, for every plan kind: the integration the GPU path runs (chunked prefill via
sink_window_prefill + paged_prefix + merge_states, kv_write, split-K decode, select-head
compaction), without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/gpu/test_engine_gpu.py runs the compiled kernels", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from headwise.engine.config import EngineConfig  # noqa: E402
from headwise.engine.llm_engine import LLMEngine  # noqa: E402
from headwise.engine.sampling_params import SamplingParams  # noqa: E402
from headwise.kernels import ops, triton_common  # noqa: E402
from tests.tiny_model import PLANS, random_prompts, write_plans, write_tiny_llama  # noqa: E402

ATOL = 1e-4  # fp32, IEEE dots: observed differences below 2e-5

if not triton_common.INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def test_engine_on_triton_kernels_equals_the_references(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "model", layers=2)  # two layers: every kernel, half the interpreter time
    plans = write_plans(model_dir, tmp_path)
    # 72-108 tokens: two prefill chunks each, past every window and select budget
    prompts = random_prompts(len(PLANS), 72, step=9)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    outs = {}
    for kernels in ("reference", "triton"):
        previous = ops.force_backend(kernels)
        try:
            eng = LLMEngine(EngineConfig(model=model_dir, plans=plans, kv_cache_mb=16, max_num_batched_tokens=64))
            outs[kernels] = eng.generate(prompts, params, PLANS)
        finally:
            ops.force_backend(previous)
        assert eng.kv_manager.num_free == eng.kv_manager.num_blocks
    for plan, ref, tri in zip(PLANS, outs["reference"], outs["triton"]):
        assert tri.token_ids == ref.token_ids, plan
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in tri.logprobs]),
            torch.tensor([lp.logprob for lp in ref.logprobs]),
            atol=ATOL,
            rtol=0,
        )
