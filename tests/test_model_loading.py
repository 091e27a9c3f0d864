"""`--model` forms and architectures: Hugging Face directories of Llama (llama3 rope
scaling), Mistral and Qwen2 (q/k/v bias) match transformers; a GGUF path loads like the
default model and reuses its converted weights; bad models give one error line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from headwise.clients.cli import main
from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.loader import resolve_model_dir, smollm2_gguf_path
from headwise.engine.sampling_params import SamplingParams

NEW_TOKENS = 12
LOGPROB_ATOL = 1e-4  # fp32 both sides, tiny models


def _tiny(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if kind == "llama3":
        return LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None, head_dim=16)
    return Qwen2Config(**common, use_sliding_window=False)


@pytest.fixture(scope="module", params=["llama3", "mistral", "qwen2"])
def tiny_model(request, tmp_path_factory, tok):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(request.param), dtype=torch.float32).eval()
    with torch.no_grad():  # transformers inits biases to zero; make Qwen2's q/k/v bias matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return request.param, str(d), model


def test_hf_directory_matches_transformers(tiny_model, tok):
    kind, path, hf = tiny_model
    eng = LLMEngine(EngineConfig(model=path, kv_cache_mb=16))
    assert eng.model_config.model_type == ("qwen2" if kind == "qwen2" else "mistral" if kind == "mistral" else "llama")
    prompt = tok("The quick brown fox jumps over the lazy dog because")["input_ids"]
    out = eng.generate(
        [prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=0)
    )[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = hf(ids).logits[0].float().log_softmax(-1)
    assert out.token_ids == ref[0, len(prompt) :].tolist()
    expected = logits[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    ours = torch.tensor(
        [next(iter(lp.values())).logprob if isinstance(lp, dict) else lp.logprob for lp in out.prompt_logprobs[1:]]
    )
    torch.testing.assert_close(ours, expected, atol=LOGPROB_ATOL, rtol=0)


def test_gguf_path_loads_like_the_default_model_and_reuses_the_cache(engine, tok):
    gguf = smollm2_gguf_path()
    converted = resolve_model_dir("smollm2-135m") / "model.safetensors"
    mtime = converted.stat().st_mtime_ns
    assert resolve_model_dir(str(gguf)) == converted.parent  # same file: same converted weights
    assert converted.stat().st_mtime_ns == mtime  # not converted again
    eng = LLMEngine(EngineConfig(model=str(gguf), kv_cache_mb=16))
    prompt = tok("The capital of France is")["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0)
    assert eng.generate([prompt], params)[0].token_ids == engine.generate([prompt], params)[0].token_ids


@pytest.mark.parametrize(
    "setup, error",
    [
        ("gpt2_dir", "architecture 'gpt2' is not supported (supported: llama, mistral, qwen2)"),
        ("broken_gguf", "cannot read GGUF {tmp}/broken.gguf: "),
        ("no_weights", "{tmp}/empty has no *.safetensors weights"),
        ("missing", "model '{tmp}/nothing' not found: use smollm2-135m, a .gguf file or a model directory"),
    ],
)
def test_bad_models_give_one_error_line(tmp_path, capsys, setup, error):
    if setup == "gpt2_dir":
        model = tmp_path / "gpt2"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    elif setup == "broken_gguf":
        model = tmp_path / "broken.gguf"
        model.write_bytes(b"GGUF" + os.urandom(64))
    elif setup == "no_weights":
        model = tmp_path / "empty"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(_tiny("qwen2").to_dict()))
    else:
        model = tmp_path / "nothing"
    os.environ["HEADWISE_CACHE"] = str(tmp_path / "cache")
    try:
        rc = main(["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "2"])
    finally:
        del os.environ["HEADWISE_CACHE"]
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"headwise generate: error: {error.format(tmp=tmp_path)}")
    assert err.count("\n") == 1
