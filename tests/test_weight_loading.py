"""Loading weights: a model built on the meta device, checkpoints streamed tensor by tensor
into its fused parameters (sharded, tied, with q/k/v bias) equal what the whole-state-dict
loader gave bit for bit; `--load-format dummy` builds the config's shapes from config.json
alone, without any checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from headwise.engine.config import EngineConfig
from headwise.engine.errors import ModelLoadError
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.loader import read_config
from headwise.engine.sampling_params import SamplingParams
from headwise.engine.weights import DUMMY_STD, build_model, load_model, materialize
from tests.tiny_model import VOCAB, random_prompts, write_tiny_llama

# /work/shared/models/llama3-8b-shape/config.json: Llama-3-8B's layers and heads with SmolLM2's vocabulary
LLAMA3_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
# 32 x (q 4096^2 + k, v 4096 x 1024 + o 4096^2 + 3 x 4096 x 14336 + 2 norms) + 2 x 49152 x 4096 + 4096
LLAMA3_8B_SHAPE_PARAMS = 7_382_241_280


def _whole_state_dict_loader(model_dir: Path, cfg, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What engine/model.py's loader did before streaming: every file into one dict, q/k/v
    and gate/up concatenated, the lm_head falling back to the embedding, then `.to(dtype)`."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    own = {
        "embed_tokens.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
        "lm_head.weight": state.get("lm_head.weight", state["model.embed_tokens.weight"]),
    }
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
            [state[a + "q_proj.weight"], state[a + "k_proj.weight"], state[a + "v_proj.weight"]]
        )
        if cfg.qkv_bias:
            own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                [state[a + "q_proj.bias"], state[a + "k_proj.bias"], state[a + "v_proj.bias"]]
            )
        own[f"layers.{i}.self_attn.o_proj.weight"] = state[a + "o_proj.weight"]
        own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
            [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]
        )
        own[f"layers.{i}.mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"]
        own[f"layers.{i}.input_layernorm.weight"] = state[p + "input_layernorm.weight"]
        own[f"layers.{i}.post_attention_layernorm.weight"] = state[p + "post_attention_layernorm.weight"]
    return {k: v.to(dtype) for k, v in own.items()}


def _assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _save(kind: str, d: Path, max_shard_size: str | None = None, **overrides) -> Path:
    """A small random transformers model of `kind` (llama, qwen2) saved to `d`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = (
        dict(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        | overrides
    )
    cfg = Qwen2Config(**common, use_sliding_window=False) if kind == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # transformers initialises biases and norms to constants: make every value count
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(d, **kw)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(write_tiny_llama(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    d = _save("llama", tmp_path_factory.mktemp("sharded"), max_shard_size="300KB")
    assert len(list(d.glob("*.safetensors"))) >= 3 and (d / "model.safetensors.index.json").is_file()
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_checkpoint_streams_into_the_same_weights_as_the_whole_state_dict(sharded_dir, dtype):
    cfg = read_config(sharded_dir)
    model = materialize(cfg, sharded_dir, dtype, "cpu")
    _assert_same_weights(model, _whole_state_dict_loader(sharded_dir, cfg, dtype))
    assert model.rotary.cos_sin.dtype == torch.float32  # the RoPE table is never rounded


def test_index_json_picks_the_files_and_ignores_stray_safetensors(sharded_dir, tmp_path):
    d = tmp_path / "with-stray"
    shutil.copytree(sharded_dir, d)
    from safetensors.torch import save_file

    # e.g. Mistral's consolidated.safetensors: other names and shapes, not in the index
    save_file({"model.norm.weight": torch.zeros(7)}, str(d / "consolidated.safetensors"))
    cfg = read_config(d)
    _assert_same_weights(
        materialize(cfg, d, torch.float32, "cpu"), _whole_state_dict_loader(sharded_dir, cfg, torch.float32)
    )


def test_index_json_naming_a_missing_shard_is_a_load_error(sharded_dir, tmp_path):
    d = tmp_path / "lost-shard"
    shutil.copytree(sharded_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (d / lost).unlink()
    with pytest.raises(ModelLoadError, match=f"model.safetensors.index.json names {lost}, which is missing"):
        materialize(read_config(d), d, torch.float32, "cpu")


def test_tied_embeddings_share_one_matrix(tmp_path):
    d = _save("llama", tmp_path, tie_word_embeddings=True)
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers does not save a tied head
    cfg = read_config(d)
    model = materialize(cfg, d, torch.float32, "cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    _assert_same_weights(model, _whole_state_dict_loader(d, cfg, torch.float32))


def test_untied_checkpoint_without_lm_head_reuses_the_embedding(tmp_path):
    d = _save("llama", tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(d / "model.safetensors"))
    cfg = read_config(d)
    model = materialize(cfg, d, torch.float32, "cpu")
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_qkv_bias_lands_in_the_fused_bias(tmp_path):
    d = _save("qwen2", tmp_path, max_shard_size="300KB")
    cfg = read_config(d)
    assert cfg.qkv_bias
    model = materialize(cfg, d, torch.float32, "cpu")
    _assert_same_weights(model, _whole_state_dict_loader(d, cfg, torch.float32))
    assert model.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0


@pytest.mark.parametrize(
    "edit, error",
    [
        ("drop", "weights lack tensor 'model.layers.1.mlp.down_proj.weight'"),
        ("reshape", r"tensor model.layers.0.self_attn.k_proj.weight: shape \(32, 128\), model expects \(64, 128\)"),
    ],
)
def test_missing_or_misshapen_tensor_is_a_load_error_naming_it(tmp_path, edit, error):
    d = _save("llama", tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    if edit == "drop":
        del state["model.layers.1.mlp.down_proj.weight"]
    else:
        state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:32]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=error):
        materialize(read_config(d), d, torch.float32, "cpu")


def test_streamed_tiny_model_generates_like_transformers(tiny_dir):
    """End to end through the engine: the streamed weights give transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    prompt = random_prompts(1, 24)[0]
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), kv_cache_mb=8))
    out = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == ref[0, len(prompt) :].tolist()


def test_dummy_format_builds_the_config_shapes_without_weights(tiny_dir, tmp_path):
    d = tmp_path / "config-only"
    d.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d)
    with pytest.raises(ModelLoadError, match="has no \\*.safetensors weights"):
        load_model(str(d), "float32", "cpu", "auto")
    cfg, model, _ = load_model(str(d), "bfloat16", "cpu", "dummy")
    reference = build_model(read_config(tiny_dir), torch.float32, "meta")
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    w = model.layers[0].mlp.down_proj.weight.float()
    assert abs(w.std().item() - DUMMY_STD) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    again = materialize(cfg, d, torch.bfloat16, "cpu", "dummy")  # seeded: the same draw
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    eng = LLMEngine(EngineConfig(model=str(d), dtype="bfloat16", load_format="dummy", kv_cache_mb=8))
    out = eng.generate(random_prompts(2, 16), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [4, 4]
    logits = eng.model.logits(eng.model.embed_tokens(torch.tensor([1, 2, 3])))
    assert torch.isfinite(logits).all()


def test_dummy_format_on_the_meta_device_has_the_llama3_8b_shape(tmp_path):
    """The 8B shape is built on the meta device: shapes and counts, no memory."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_SHAPE))
    cfg = read_config(tmp_path)
    model = materialize(cfg, tmp_path, torch.bfloat16, "meta", "dummy")
    assert sum(p.numel() for p in model.parameters()) == LLAMA3_8B_SHAPE_PARAMS
    attn, mlp = model.layers[31].self_attn, model.layers[31].mlp
    assert attn.qkv_proj.weight.shape == (4096 + 2 * 1024, 4096)
    assert attn.o_proj.weight.shape == (4096, 4096)
    assert mlp.gate_up_proj.weight.shape == (2 * 14336, 4096)
    assert mlp.down_proj.weight.shape == (4096, 14336)
    assert model.lm_head.weight.shape == model.embed_tokens.weight.shape == (49152, 4096)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rotary.cos_sin.dtype == torch.float32


def test_load_format_is_checked():
    with pytest.raises(ValueError, match="load_format 'fast' is not supported; choose one of auto, dummy"):
        EngineConfig(load_format="fast")


_PEAK_PROBE = """
import json, resource, sys, torch
from pathlib import Path
import safetensors.torch  # imported before the baseline: its module is not the load's
from headwise.engine.loader import read_config
from headwise.engine.weights import materialize
d = Path(sys.argv[1])
cfg = read_config(d)
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
model = materialize(cfg, d, torch.float32, "cpu")
# VmHWM, not ru_maxrss: the latter keeps the parent's RSS at the (v)fork that started us
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({"peak_over": peak - before, "weights": sum(p.numel() * 4 for p in model.parameters())}))
"""


def test_host_peak_is_the_model_plus_the_mapped_file(tmp_path):
    """A 143 MB fp32 checkpoint loaded on the CPU in a fresh process: the host's peak over
    its RSS before is at most the model (143 MB) plus the file's mapped pages (143 MB) plus
    24 MB; the whole-state-dict loader also held the concatenated q/k/v and gate/up (352 MB
    in all, measured with main's code)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    config = {
        "model_type": "llama",
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    meta = build_model(read_config(tmp_path), torch.float32, "meta")
    params = dict(meta.named_parameters())
    state = {}
    for name, slot in meta.hf_slots().items():
        shape = list(params[slot.param].shape)
        shape[0] = slot.rows if slot.rows is not None else shape[0]
        state[name] = torch.randn(shape)
    save_file(state, str(tmp_path / "model.safetensors"))
    del state
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    r = json.loads(out.stdout)
    assert r["weights"] == 35_660_288 * 4
    # measured here: 8 MB over model + file; the whole-state-dict loader: 67 MB over
    assert r["peak_over"] <= r["weights"] + file_bytes + 24 * 2**20
