"""A model's weights, materialised once on the target device in the target dtype.

The model is built on the meta device (no memory, no initialisation), then given empty
tensors on the target device; a checkpoint is streamed into them tensor by tensor
(`--load-format auto`) or they are drawn at random from the config alone (`dummy`, vLLM's
name: benchmarks of shapes whose weights cannot be downloaded). Nothing holds the model
in fp32 on the host on the way, so beyond the weights themselves the host holds about one
tensor (plus the mapped file's pages), not the fp32 build, the whole state dict, the
concatenated q/k/v and gate/up and the conversion of the old loader.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from headwise.engine.config import LOAD_FORMATS
from headwise.engine.cpu_memory import keep_freed_memory
from headwise.engine.distributed import TPGroup
from headwise.engine.loader import (
    ModelConfig,
    load_tokenizer,
    model_id,
    read_config,
    read_safetensors,
    resolve_model_dir,
)
from headwise.engine.model import LlamaModel, Shard

log = logging.getLogger(__name__)

# Hugging Face's default `initializer_range`: activations stay finite through every layer
DUMMY_STD = 0.02
# fixed like vLLM's dummy loader, so two runs of a benchmark draw the same weights
DUMMY_SEED = 1234


def build_model(
    cfg: ModelConfig, dtype: torch.dtype, device: str, shard: Shard | None = None, tp: TPGroup | None = None
) -> LlamaModel:
    """An uninitialised model (or one tensor-parallel rank's part of it) whose parameters
    already live on `device` in `dtype` (RoPE frequencies stay fp32)."""
    with torch.device("meta"):
        model = LlamaModel(cfg, shard, tp)
    # Module.to_empty with the dtype folded in; torch.empty rather than to_empty's
    # empty_like, whose first call on meta tensors costs ~0.7 s of dispatch setup
    model._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device))
    if torch.device(device).type == "cpu":
        model.store_linears_column_major()
    if cfg.tie_word_embeddings:
        model.tie_embeddings()
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: LlamaModel, seed: int = DUMMY_SEED) -> None:
    """Random weights as Hugging Face initialises a Llama: normal(0, 0.02) matrices and
    embeddings, zero biases, unit norm scales; drawn on the parameters' device."""
    generator = None
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, DUMMY_STD, generator=generator)


def materialize(
    cfg: ModelConfig,
    model_dir: Path,
    dtype: torch.dtype,
    device: str,
    load_format: str = "auto",
    shard: Shard | None = None,
    tp: TPGroup | None = None,
) -> LlamaModel:
    """The model of `cfg` (or `shard` of it) on `device` in `dtype`, its weights streamed from
    `model_dir`'s safetensors (`auto`) or random (`dummy`: no checkpoint is read; each rank
    draws its own part)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not supported; choose one of {', '.join(LOAD_FORMATS)}")
    model = build_model(cfg, dtype, device, shard, tp)
    if load_format == "dummy":
        init_dummy_weights(model, DUMMY_SEED + (shard.rank if shard else 0))
    else:
        model.load_weights(read_safetensors(model_dir, device))
    return model


def load_model(
    model: str,
    dtype: str = "float32",
    device: str = "cpu",
    load_format: str = "auto",
    shard: Shard | None = None,
    tp: TPGroup | None = None,
) -> tuple[ModelConfig, LlamaModel, Any]:
    """(config, model, tokenizer) of `--model` (a transformers tokenizer, used duck-typed); engines and profilers in one process share
    the read-only weights. `load_format` "dummy" reads config.json alone (random weights).
    With `shard` (tensor parallelism) this rank's part of the model, never shared. A model on
    the CPU also makes this process keep freed memory (engine/cpu_memory.py)."""
    if torch.device(device).type == "cpu":
        keep_freed_memory()
    if shard is not None:
        return _load.__wrapped__(str(resolve_model_dir(model)), model_id(model), dtype, device, load_format, shard, tp)
    return _load(str(resolve_model_dir(model)), model_id(model), dtype, device, load_format)


@functools.lru_cache(maxsize=2)
def _load(
    model_dir: str,
    name: str,
    dtype: str,
    device: str,
    load_format: str = "auto",
    shard: Shard | None = None,
    tp: TPGroup | None = None,
) -> tuple[ModelConfig, LlamaModel, object]:
    cfg = read_config(Path(model_dir), name)
    started = time.perf_counter()
    model = materialize(cfg, Path(model_dir), getattr(torch, dtype), device, load_format, shard, tp)
    log.info(
        "%s weights of %s (%.1fM parameters, %s, %s) ready in %.1f s",
        "random" if load_format == "dummy" else "loaded",
        name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        device,
        time.perf_counter() - started,
    )
    return cfg, model, load_tokenizer(Path(model_dir))
