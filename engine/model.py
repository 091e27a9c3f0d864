"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) as plain PyTorch.

Tokens of all sequences in a step are one flat batch `[T, hidden]`; attention goes
through the paged cache (`engine.attention`). q/k/v and gate/up projections are fused
parameters so each costs one matmul; `load_weights` writes each Hugging Face tensor into
its slice of them (`engine/weights.py` builds the model and streams the tensors). The
elementwise work of a layer is two fused RMSNorm launches (each also adding the residual)
and one RoPE launch for q and k (`kernels.ops`: Triton on CUDA, the torch references on
the CPU); cos / sin come from a table computed once and gathered once per forward.

Tensor parallelism (Megatron-style): with a `Shard`, a rank holds its KV heads (any subset
per layer, in the order the head-balanced sharding chose) with their GQA query heads:
column-parallel q/k/v and gate/up, row-parallel o_proj and down_proj followed by an
all-reduce; the embedding, norms and lm_head are replicated (every rank computes the same
hidden states, rank 0 samples).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headwise.engine.attention import AttentionMetadata, paged_attention
from headwise.engine.cpu_linear import PackedWeight, can_pack
from headwise.engine.distributed import TPGroup
from headwise.engine.errors import ModelLoadError
from headwise.engine.loader import ModelConfig
from headwise.kernels import ops, reference_layer
from headwise.kvcache.buffers import KVBuffers

# CPU logits: lm_head's packed copy for the rows it serves (fp32 1-32, bf16 all), else one row
# from its column-major copy (LlamaModel.copy_lm_head_column_major), else up to
# LM_HEAD_TRANSPOSED_ROWS as `W h^T`
LM_HEAD_COLUMN_MAJOR_ROWS = 1
LM_HEAD_TRANSPOSED_ROWS = 64
LM_HEAD_COPY_MAX_BYTES = 256 << 20
PACKED_COPY_MAX_BYTES = 2 << 30


class Linear(nn.Linear):
    # the CPU's packed copy of the loaded weight and the row counts it serves (engine/cpu_linear.py)
    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if packed is not None and packed.serves(x):
            return packed.linear(x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def reset_parameters(self) -> None:
        # a model built on the meta device is always loaded or drawn afterwards, and torch's
        # init functions on meta tensors run Python decompositions whose first call costs 1-3 s
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def store_column_major(self) -> None:
        """Hold the weight `[out, in]` in column-major memory (an `[in, out]` row-major
        buffer, transposed), values unset: `x @ weight.T` then reads the buffer as a plain
        row-major matrix, which MKL multiplies faster on the CPU for a few rows (one decode
        row of the default model's layers: 22 vs 28 ms, both at memory bandwidth's mercy;
        equal from ~64 rows on). Called before the weights are loaded or drawn."""
        w = self.weight
        self.weight = nn.Parameter(
            torch.empty_strided(w.shape, (1, w.shape[0]), dtype=w.dtype, device=w.device),
            requires_grad=w.requires_grad,
        )


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":  # as Linear
            super().reset_parameters()


class RMSNorm(nn.Module):
    """`norm(x)`, or `norm(x, residual)` -> `(norm(x + residual), x + residual)`: the
    residual add of the block before fused into the norm (vLLM's fused_add_rms_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


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


def rope_table(inv_freq: torch.Tensor, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """`[2, max_positions, D/2]` fp32: cos, then sin, of every position's angles (computed
    as the per-step `positions * inv_freq` was), written in place: no `[P, D]` temporaries."""
    table = torch.empty(2, max_positions, inv_freq.numel(), dtype=torch.float32, device=device)
    # a meta model holds no values (and a meta cos would import torch's Python decompositions,
    # ~150 MB of host memory)
    if table.device.type != "meta":
        freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq.to(device)[None, :]
        torch.cos(freqs, out=table[0])
        torch.sin(freqs, out=table[1])
    return table


class Rotary(nn.Module):
    """cos / sin of every position up to the model's context length, computed once in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._inv_freq32 = rope_inv_freq(cfg)
        self.max_positions = cfg.max_position_embeddings
        # on the default device: free on the meta device, where engine/weights.py builds
        # the model; `_apply` computes it where the model is materialised
        table = rope_table(self._inv_freq32, self.max_positions, torch.get_default_device())
        self.register_buffer("cos_sin", table, persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(dtype=bfloat16)` and the materialisation move the table but must not
        # round it: rebuilt in fp32 where it landed (on the device, as the per-step angles
        # used to be computed)
        super()._apply(fn, recurse)
        self.cos_sin = rope_table(self._inv_freq32, self.max_positions, self.cos_sin.device)
        return self

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[T, D/2]` of `positions`: one gather, shared by every layer of a forward."""
        cos, sin = self.cos_sin[:, positions]
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotated q `[T, Hq, D]` and k `[T, Hkv, D]` (for dense forwards outside the engine)."""
        return ops.apply_rotary(q, k, *self.cos_sin_at(positions))


@dataclass(frozen=True)
class Shard:
    """One tensor-parallel rank's part of the model: its KV heads per layer (model
    numbering, in the order its weights and caches hold them)."""

    rank: int
    size: int
    kv_heads: tuple[tuple[int, ...], ...]

    @staticmethod
    def whole(cfg: ModelConfig) -> Shard:
        return Shard(0, 1, tuple(tuple(range(cfg.num_kv_heads)) for _ in range(cfg.num_layers)))

    def check(self, cfg: ModelConfig) -> None:
        if cfg.intermediate_size % self.size:
            raise ModelLoadError(
                f"--tensor-parallel-size {self.size}: the MLP's {cfg.intermediate_size} "
                "intermediate channels do not divide by it"
            )

    def query_heads(self, cfg: ModelConfig, layer: int) -> list[int]:
        group = cfg.num_heads // cfg.num_kv_heads
        return [h * group + g for h in self.kv_heads[layer] for g in range(group)]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard, tp: TPGroup):
        super().__init__()
        self.layer = layer
        self.tp = tp
        self.hq, self.hkv, self.d = cfg.num_heads // shard.size, cfg.num_kv_heads // shard.size, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.hq * self.d, cfg.hidden_size, bias=False)
        self.scale = self.d**-0.5

    def forward(self, x, cos, sin, meta: AttentionMetadata, buffers: KVBuffers):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k = ops.apply_rotary(q.view(t, self.hq, self.d), k.view(t, self.hkv, self.d), cos, sin)
        o = paged_attention(self.layer, q, k, v.view(t, self.hkv, self.d), meta, buffers, self.scale)
        return self.tp.all_reduce(self.o_proj(o.reshape(t, self.hq * self.d)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, tp: TPGroup):
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size // shard.size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.tp.all_reduce(self.down_proj(reference_layer.silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, shard, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shard, tp)

    def forward(self, x, residual, cos, sin, meta, buffers):
        """(block output, residual stream before it): the caller's next norm adds the two."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, meta, buffers)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard | None = None, tp: TPGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.shard = shard or Shard.whole(cfg)
        self.shard.check(cfg)
        tp = tp or TPGroup()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.shard, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._lm_head_column_major: torch.Tensor | None = None
        self._lm_head_packed: PackedWeight | None = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, buffers: KVBuffers) -> torch.Tensor:
        """Final hidden states `[T, hidden]` (call `logits` on the rows that need them)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin_at(meta.positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, meta, buffers)
        return self.norm(x, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if self._lm_head_packed is not None and self._lm_head_packed.serves(hidden):
            return self._lm_head_packed.linear(hidden, None).float()
        if self._lm_head_column_major is not None and rows <= LM_HEAD_COLUMN_MAJOR_ROWS:
            return F.linear(hidden, self._lm_head_column_major).float()
        if hidden.device.type == "cpu" and rows <= LM_HEAD_TRANSPOSED_ROWS:
            # (W h^T)^T: MKL's kernel for many output rows and few columns
            return torch.mm(self.lm_head.weight, hidden.t()).t().contiguous().float()
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def copy_lm_head_column_major(self) -> None:
        """The CPU's logits: keep a column-major copy of the loaded lm_head weight for up to
        LM_HEAD_COLUMN_MAJOR_ROWS rows and multiply `W h^T` up to LM_HEAD_TRANSPOSED_ROWS
        (measured on the default model's 49152 x 576 matrix, one thread, ms for 1 / 2 / 4 / 8 /
        16 rows: `h W^T` 8.5 / 18.5 / 21.3 / 23.1 / 32.6, column-major 4.8 / 9.2 / 26.6 / 29.8 /
        39.3, `W h^T` 8.5 / 10.1 / 10.4 / 17.7 / 29.6). The copy costs the matrix once more
        (113 MB in fp32 for the default model), so a matrix over LM_HEAD_COPY_MAX_BYTES gets
        none, nor does one whose packed copy serves a single row (fp32's column blocks and bf16's
        oneDNN copy: `pack_linears`); called
        once the weights are loaded (engine/model_runner.py), again: no-op."""
        w, packed = self.lm_head.weight, self._lm_head_packed
        if packed is not None and packed.lo <= 1:
            return
        if self._lm_head_column_major is None and w.numel() * w.element_size() <= LM_HEAD_COPY_MAX_BYTES:
            self._lm_head_column_major = w.detach().t().contiguous().t()

    def pack_linears(self) -> None:
        """The CPU's matmuls from packed copies of the loaded weights (`PackedWeight`,
        engine/cpu_linear.py: fp32 column blocks for 1-32 rows, or oneDNN's for 2-32 where those do
        not serve; bf16 oneDNN's for all): every decoder projection and
        lm_head, unless the copies together would pass PACKED_COPY_MAX_BYTES (they cost the
        weights once more; 537 MB for the default model in fp32); called once the weights are
        loaded, before `copy_lm_head_column_major`; again: no-op."""
        linears = [m for m in self.layers.modules() if isinstance(m, Linear)] + [self.lm_head]
        weights = [m.weight for m in linears]
        if not all(can_pack(w) for w in weights) or self._lm_head_packed is not None:
            return
        if sum(w.numel() * w.element_size() for w in weights) > PACKED_COPY_MAX_BYTES:
            return
        for module in linears[:-1]:
            module.packed = PackedWeight.of(module.weight)
        self._lm_head_packed = PackedWeight.of(self.lm_head.weight)

    def store_linears_column_major(self) -> None:
        """Every decoder layer's projection in column-major memory (`Linear.store_column_major`;
        the CPU layout). lm_head stays row-major: it is the embedding matrix when tied (see
        `copy_lm_head_column_major`)."""
        for module in self.layers.modules():
            if isinstance(module, Linear):
                module.store_column_major()

    def tie_embeddings(self) -> None:
        """lm_head shares the embedding matrix (`tie_word_embeddings`); called after the
        model is materialised, which gives each module a tensor of its own."""
        self.lm_head.weight = self.embed_tokens.weight

    def hf_slots(self) -> dict[str, WeightSlot]:
        """Where each Hugging Face tensor goes, in checkpoint order (the first missing one is
        the one an error names); a tied lm_head takes no tensor of its own."""
        cfg, shard = self.cfg, self.shard
        d, n = cfg.head_dim, shard.size
        q, kv, inter = cfg.num_heads * d // n, cfg.num_kv_heads * d // n, cfg.intermediate_size // n
        slots = {
            "model.embed_tokens.weight": WeightSlot("embed_tokens.weight"),
            "model.norm.weight": WeightSlot("norm.weight"),
        }
        if not cfg.tie_word_embeddings:
            slots["lm_head.weight"] = WeightSlot("lm_head.weight")
        sharded = n > 1 or any(list(h) != sorted(h) for h in shard.kv_heads)
        mine = torch.arange(shard.rank * inter, (shard.rank + 1) * inter) if n > 1 else None
        for i in range(cfg.num_layers):
            hf, own = f"model.layers.{i}.", f"layers.{i}."
            # this rank's rows (q/k/v, gate/up) and columns (o_proj, down_proj) of each tensor
            q_rows = _head_rows(shard.query_heads(cfg, i), d) if sharded else None
            kv_rows = _head_rows(list(shard.kv_heads[i]), d) if sharded else None
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                fused = f"{own}self_attn.qkv_proj.{kind}"
                slots[f"{hf}self_attn.q_proj.{kind}"] = WeightSlot(fused, 0, q, q_rows)
                slots[f"{hf}self_attn.k_proj.{kind}"] = WeightSlot(fused, q, kv, kv_rows)
                slots[f"{hf}self_attn.v_proj.{kind}"] = WeightSlot(fused, q + kv, kv, kv_rows)
            slots[f"{hf}self_attn.o_proj.weight"] = WeightSlot(f"{own}self_attn.o_proj.weight", cols=q_rows)
            slots[f"{hf}mlp.gate_proj.weight"] = WeightSlot(f"{own}mlp.gate_up_proj.weight", 0, inter, mine)
            slots[f"{hf}mlp.up_proj.weight"] = WeightSlot(f"{own}mlp.gate_up_proj.weight", inter, inter, mine)
            slots[f"{hf}mlp.down_proj.weight"] = WeightSlot(f"{own}mlp.down_proj.weight", cols=mine)
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
            dest: torch.Tensor = params[slot.param]
            if slot.rows is not None:
                dest = dest.narrow(0, slot.start, slot.rows)
            tensor = slot.take(tensor)
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
    """Rows `[start, start + rows)` of parameter `param` (all of it when rows is None),
    filled from the checkpoint tensor's `source_rows` (or `cols`) when this rank holds a
    part of it."""

    param: str
    start: int = 0
    rows: int | None = None
    source_rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.source_rows is not None:
            tensor = tensor.index_select(0, self.source_rows.to(tensor.device))
        if self.cols is not None:
            tensor = tensor.index_select(1, self.cols.to(tensor.device))
        return tensor


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of `heads` in a `[num_heads * head_dim, ...]` projection."""
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
