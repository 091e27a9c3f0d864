"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) as plain PyTorch.

Tokens of all sequences in a step are one flat batch `[T, hidden]`; attention goes
through the paged cache (`engine.attention`). q/k/v and gate/up projections are fused
parameters so each costs one matmul; `load_weights` writes each Hugging Face tensor into
its slice of them (`engine/weights.py` builds the model and streams the tensors).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headwise.engine.attention import AttentionMetadata, paged_attention
from headwise.kvcache.buffers import KVBuffers
from headwise.engine.errors import ModelLoadError
from headwise.engine.loader import ModelConfig


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        # a model built on the meta device is always loaded or drawn afterwards, and torch's
        # init functions on meta tensors run Python decompositions whose first call costs 1-3 s
        if self.weight.device.type != "meta":
            super().reset_parameters()


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":  # as Linear
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 as the reference implementation does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    # float32 like the reference implementation, so positions rotate identically
    # on the CPU even while the model is built on the meta device: the buffer is restored
    # from these values when the model is materialised
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "linear":
        inv = inv / sc["factor"]
    elif sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._inv_freq32 = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", self._inv_freq32.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(dtype=bfloat16)` moves the frequencies but must not round them
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq32.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        self.scale = self.d ** -0.5

    def forward(self, x, positions, rotary: Rotary, meta: AttentionMetadata, buffers: KVBuffers):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k = rotary(positions, q.view(t, self.hq, self.d), k.view(t, self.hkv, self.d))
        o = paged_attention(self.layer, q, k, v.view(t, self.hkv, self.d), meta, buffers, self.scale)
        return self.o_proj(o.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, rotary, meta, buffers):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, meta, buffers)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, buffers: KVBuffers) -> torch.Tensor:
        """Final hidden states `[T, hidden]` (call `logits` on the rows that need them)."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, meta.positions, self.rotary, meta, buffers)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def tie_embeddings(self) -> None:
        """lm_head shares the embedding matrix (`tie_word_embeddings`); called after the
        model is materialised, which gives each module a tensor of its own."""
        self.lm_head.weight = self.embed_tokens.weight

    def hf_slots(self) -> dict[str, WeightSlot]:
        """Where each Hugging Face tensor goes, in checkpoint order (the first missing one is
        the one an error names); a tied lm_head takes no tensor of its own."""
        cfg = self.cfg
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        slots = {"model.embed_tokens.weight": WeightSlot("embed_tokens.weight"),
                 "model.norm.weight": WeightSlot("norm.weight")}
        if not cfg.tie_word_embeddings:
            slots["lm_head.weight"] = WeightSlot("lm_head.weight")
        for i in range(cfg.num_layers):
            hf, own = f"model.layers.{i}.", f"layers.{i}."
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                fused = f"{own}self_attn.qkv_proj.{kind}"
                slots[f"{hf}self_attn.q_proj.{kind}"] = WeightSlot(fused, 0, q)
                slots[f"{hf}self_attn.k_proj.{kind}"] = WeightSlot(fused, q, kv)
                slots[f"{hf}self_attn.v_proj.{kind}"] = WeightSlot(fused, q + kv, kv)
            slots[f"{hf}self_attn.o_proj.weight"] = WeightSlot(f"{own}self_attn.o_proj.weight")
            slots[f"{hf}mlp.gate_proj.weight"] = WeightSlot(f"{own}mlp.gate_up_proj.weight", 0, inter)
            slots[f"{hf}mlp.up_proj.weight"] = WeightSlot(f"{own}mlp.gate_up_proj.weight", inter, inter)
            slots[f"{hf}mlp.down_proj.weight"] = WeightSlot(f"{own}mlp.down_proj.weight")
            for norm in ("input_layernorm", "post_attention_layernorm"):
                slots[f"{hf}{norm}.weight"] = WeightSlot(f"{own}{norm}.weight")
        return slots

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters one at a time (converting to
        the parameters' dtype and device), each shard of q/k/v and gate/up into its slice of
        the fused parameter, as vLLM's `weight_loader` does; names the model does not use
        (e.g. `rotary_emb.inv_freq` of old checkpoints) are skipped. A checkpoint without
        lm_head reuses the embedding matrix."""
        slots = self.hf_slots()
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in tensors:
            slot = slots.get(name)
            if slot is None:
                continue
            dest = params[slot.param]
            if slot.rows is not None:
                dest = dest.narrow(0, slot.start, slot.rows)
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ModelLoadError(f"tensor {name}: shape {tuple(tensor.shape)}, model expects {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(name)
        if "lm_head.weight" in slots and "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
            self.lm_head.weight.copy_(self.embed_tokens.weight)
            loaded.add("lm_head.weight")
        missing = next((name for name in slots if name not in loaded), None)
        if missing is not None:
            raise ModelLoadError(f"weights lack tensor {missing!r}")


@dataclass(frozen=True)
class WeightSlot:
    """Rows `[start, start + rows)` of parameter `param` (all of it when rows is None)."""

    param: str
    start: int = 0
    rows: int | None = None
