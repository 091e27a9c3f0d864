"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) as plain PyTorch.

Tokens of all sequences in a step are one flat batch `[T, hidden]`; attention goes
through the paged cache (`engine.attention`). q/k/v and gate/up projections are fused
at load time so each costs one matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from headwise.engine.attention import AttentionMetadata, paged_attention
from headwise.kvcache.buffers import KVBuffers
from headwise.engine.errors import ModelLoadError
from headwise.engine.loader import ModelConfig


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
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=False)
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
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

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

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face parameter names, fusing q/k/v and gate/up."""
        own: dict[str, torch.Tensor] = {}
        try:
            own["embed_tokens.weight"] = state["model.embed_tokens.weight"]
            own["norm.weight"] = state["model.norm.weight"]
            own["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
            for i in range(self.cfg.num_layers):
                p = f"model.layers.{i}."
                a = p + "self_attn."
                own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                    [state[a + "q_proj.weight"], state[a + "k_proj.weight"], state[a + "v_proj.weight"]])
                if self.cfg.qkv_bias:
                    own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                        [state[a + "q_proj.bias"], state[a + "k_proj.bias"], state[a + "v_proj.bias"]])
                own[f"layers.{i}.self_attn.o_proj.weight"] = state[a + "o_proj.weight"]
                own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                    [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
                own[f"layers.{i}.mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"]
                own[f"layers.{i}.input_layernorm.weight"] = state[p + "input_layernorm.weight"]
                own[f"layers.{i}.post_attention_layernorm.weight"] = state[p + "post_attention_layernorm.weight"]
        except KeyError as e:
            raise ModelLoadError(f"weights lack tensor {e.args[0]!r}") from e
        expected = self.state_dict()
        for name, tensor in own.items():
            if tensor.shape != expected[name].shape:
                raise ModelLoadError(f"tensor {name}: shape {tuple(tensor.shape)}, model expects "
                                     f"{tuple(expected[name].shape)}")
        self.load_state_dict(own, strict=True)
