"""The model's fused ops, the batched sampler and the forward's host syncs, compiled on CUDA.

- rms_norm / add_rms_norm / apply_rotary against the torch references at Llama-3-8B and
  SmolLM2 shapes: RoPE bit-identical in every dtype (no FMA contraction; round to nearest
  on the GPU, as torch does); norms within fp32 1e-5, fp16 1e-3, bf16 2e-2 (a different
  summation order and the GPU's rsqrt);
- causal_prefill (flash-attn or torch's varlen flash attention, given max_seqlen) against
  the reference SDPA loop, bf16 within 2e-2;
- the batched sampler draws the tokens the per-row sampler it replaced drew on the same
  CUDA logits and seeds, and reads the device back once, explicitly;
- a forward (prefill and decode, every plan kind, bf16) makes no implicit host sync:
  torch.cuda.set_sync_debug_mode("error") around LlamaModel.forward.
"""

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
from headwise.engine.llm_engine import LLMEngine  # noqa: E402
from headwise.engine.sampler import Sampler  # noqa: E402
from headwise.engine.sampling_params import SamplingParams  # noqa: E402
from headwise.kernels import ops  # noqa: E402
from headwise.kernels import reference as ref  # noqa: E402
from headwise.kernels import triton_ops as tri  # noqa: E402
from tests.sampler_cases import mixed_batch, per_row_sample  # noqa: E402
from tests.tiny_model import PLANS, random_prompts, write_plans, write_tiny_llama  # noqa: E402

DEV = torch.device("cuda")
NORM_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096])
def test_rms_norm_and_residual_add_match_reference(dtype, hidden):
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(300, 2 * hidden, device=DEV, generator=gen) * 3).to(dtype)[:, :hidden]
    residual = torch.randn(300, hidden, device=DEV, generator=gen).to(dtype)
    weight = (torch.rand(hidden, device=DEV, generator=gen) + 0.5).to(dtype)
    tol = NORM_TOL[dtype]
    torch.testing.assert_close(tri.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5), atol=tol, rtol=tol)
    y, s = tri.add_rms_norm(x, residual, weight, 1e-5)
    y_ref, s_ref = ref.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,hq,hkv", [(128, 32, 8), (64, 9, 3)])
def test_rotary_is_bit_identical_to_reference(dtype, head_dim, hq, hkv):
    t = 257
    gen = torch.Generator(device=DEV).manual_seed(1)
    qkv = torch.randn(t, (hq + 2 * hkv) * head_dim, device=DEV, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(t, hkv, head_dim)
    inv = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=DEV).float() / head_dim))
    angles = torch.arange(t, device=DEV, dtype=torch.float32)[:, None] * 37 * inv[None, :]
    table = torch.cat([angles.cos(), angles.sin()], dim=-1)
    cos, sin = table[:, : head_dim // 2], table[:, head_dim // 2 :]
    (qo, ko), (q_ref, k_ref) = tri.apply_rotary(q, k, cos, sin), ref.apply_rotary(q, k, cos, sin)
    assert torch.equal(qo, q_ref) and torch.equal(ko, k_ref)


@pytest.mark.parametrize("lens", [[700], [1, 300, 0, 1025]])
def test_causal_prefill_with_host_max_seqlen_matches_reference(lens):
    hq, hkv, d, t = 32, 8, 128, sum(lens)
    gen = torch.Generator(device=DEV).manual_seed(2)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV, generator=gen).to(torch.bfloat16)
    q = qkv[:, : hq * d].view(t, hq, d).contiguous()
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d).contiguous()
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)  # a strided view, as the model passes it
    cu = torch.tensor([sum(lens[:i]) for i in range(len(lens) + 1)], dtype=torch.int32, device=DEV)
    out = ops.causal_prefill(q, k, v, cu, d**-0.5, max(lens))
    torch.testing.assert_close(out.float(), ref.causal_prefill(q, k, v, cu, d**-0.5).float(), atol=2e-2, rtol=2e-2)


def test_batched_sampler_draws_the_per_row_samplers_tokens_on_cuda():
    vocab = 32000
    sampler = Sampler(vocab, eos_ids=(2,), device=DEV)
    for step in range(5):
        logits = torch.randn(32, vocab, device=DEV, generator=torch.Generator(device=DEV).manual_seed(step)) * 4
        want = per_row_sample(logits, mixed_batch(step), (2,))
        seqs = mixed_batch(step)
        sampler.prefetch_noise(seqs)
        got, _ = sampler.sample(logits.clone(), seqs)
        assert got == want, step


def test_sampler_reads_the_device_back_once_and_explicitly():
    seqs = mixed_batch(7)
    sampler = Sampler(32000, eos_ids=(2,), device=DEV)
    logits = torch.randn(32, 32000, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, logprobs = sampler.sample(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(tokens) == 32 and sum(lp is not None for lp in logprobs) == 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return model_dir, write_plans(model_dir, tmp_path_factory.mktemp("plans"))


def test_forward_makes_no_implicit_host_sync(tiny):
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pytest.importorskip("torch.nn.attention.varlen", reason="no varlen attention: full-head prefill syncs")
    model_dir, plans = tiny
    # eager decode, so decode steps go through forward too (a captured graph cannot sync at all)
    eng = LLMEngine(
        EngineConfig(
            model=model_dir,
            device="cuda",
            dtype="bfloat16",
            plans=plans,
            kv_cache_mb=64,
            max_num_batched_tokens=96,
            enforce_eager=True,
        )
    )
    forward = eng.model.forward
    calls = []

    def checked(*args, **kw):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            calls.append(1)

    eng.model.forward = checked  # the model is shared by engines of this model dir: restored below
    try:
        outs = eng.generate(
            random_prompts(len(PLANS), 150), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), PLANS
        )
    finally:
        del eng.model.forward
    assert all(len(o.token_ids) == 6 for o in outs) and len(calls) > 6
