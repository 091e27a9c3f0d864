"""FP8 KV cache on CUDA: the compiled kv_write stores the bytes torch's rounding stores
(the GPU rounds to nearest like torch, unlike the interpreter), decode and prefix over the
fp8 pool match the references within the query dtype's tolerance (fp16 5e-3, bf16 2e-2;
lse 1e-3), and an engine with --kv-cache-dtype fp8 serves every plan kind on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: the kernels would not be compiled", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from headwise.kernels import reference as ref  # noqa: E402
from headwise.kernels import triton_ops as tri  # noqa: E402
from headwise.kernels.kv_quant import fp8_max  # noqa: E402
from headwise.kernels.layout import UNBOUNDED  # noqa: E402
from headwise.kernels.triton_cases import allocate, decode_args, head_capacity, keep_of, rows_of, slot_mapping  # noqa: E402

DEV = torch.device("cuda")
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
HKV = 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cdt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_write_decode_and_prefix_on_cuda_match_the_reference(dtype, cdt):
    gen = torch.Generator().manual_seed(0)
    lens = [1, 300, 2000]
    sink = torch.tensor([[0, 4, 0, 4]] * len(lens), dtype=torch.int32)
    recent = torch.tensor([[UNBOUNDED, 256, UNBOUNDED, 64]] * len(lens), dtype=torch.int32)
    caps = torch.tensor(
        [[head_capacity(int(sink[s, h]), int(recent[s, h]), n) for h in range(HKV)] for s, n in enumerate(lens)]
    )
    cache = allocate(caps, 16, 128, dtype, DEV, gen)
    cache.k_cache, cache.v_cache = (torch.zeros(cache.k_cache.shape, dtype=cdt, device=DEV) for _ in range(2))
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEV)
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)]).to(DEV)
    k = (torch.randn(len(pos), HKV, 128, generator=gen) * 3).to(DEV, dtype)
    v = torch.randn(len(pos), HKV, 128, generator=gen).to(DEV, dtype)
    ks = (k.float().abs().amax(dim=(0, 2)) / fp8_max(cdt) / 2).contiguous()  # half: some values saturate
    vs = (v.float().abs().amax(dim=(0, 2)) / fp8_max(cdt)).contiguous()
    slots = slot_mapping(cache, pos, seq, sink, recent)
    mine = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.pos_cache)]
    ref.kv_write(k, v, pos, slots, cache.k_cache, cache.v_cache, cache.pos_cache, ks, vs)
    tri.kv_write(k, v, pos, slots, *mine, ks, vs)
    for a, b in zip(mine, (cache.k_cache, cache.v_cache, cache.pos_cache)):
        assert torch.equal(a.view(torch.uint8) if a.dtype == cdt else a, b.view(torch.uint8) if b.dtype == cdt else b)
    q = torch.randn(len(lens), HKV * 4, 128, generator=gen).to(DEV, dtype)
    args = decode_args(cache, q, torch.tensor([n - 1 for n in lens], device=DEV), sink, recent, 0.1)
    (o, lse), (o_ref, lse_ref) = tri.paged_decode(*args, ks, vs), ref.paged_decode(*args, ks, vs)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=1e-3)
    q_pos = torch.cat([torch.arange(n, n + 9) for n in lens]).to(DEV)
    q_seq = torch.arange(len(lens)).repeat_interleave(9).to(DEV)
    qc = torch.randn(len(q_pos), HKV * 4, 128, generator=gen).to(DEV, dtype)
    pargs = (qc, q_pos, q_seq, cache.k_cache, cache.v_cache, cache.pos_cache, cache.block_tables, rows_of(cache))
    pargs += (cache.lengths, keep_of(cache, sink), recent.to(DEV), 0.1, ks, vs)
    (o, lse), (o_ref, lse_ref) = tri.paged_prefix(*pargs), ref.paged_prefix(*pargs)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=1e-3)


def test_engine_with_an_fp8_cache_serves_every_plan_kind_on_cuda(tmp_path):
    from headwise.engine.config import EngineConfig
    from headwise.engine.llm_engine import LLMEngine
    from headwise.engine.sampling_params import SamplingParams
    from tests.tiny_model import PLANS, random_prompts, write_plans, write_tiny_llama

    model = write_tiny_llama(tmp_path / "model")
    plans = write_plans(model, tmp_path)
    prompts = random_prompts(len(PLANS), 70, step=13)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = {}
    for kv in ("auto", "fp8"):
        eng = LLMEngine(
            EngineConfig(
                model=model,
                plans=plans,
                device="cuda",
                dtype="bfloat16",
                kv_cache_mb=8,
                max_num_batched_tokens=48,
                kv_cache_dtype=kv,
            )
        )
        outs[kv] = eng.generate(prompts, params, PLANS)
        assert eng.block_census()["held"] == 0
    for a, b in zip(outs["auto"], outs["fp8"]):
        assert len(b.token_ids) == 10 and b.kv_bytes * 2 == a.kv_bytes, a.plan  # bf16: 2 bytes, fp8: 1
