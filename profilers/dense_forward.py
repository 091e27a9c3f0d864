"""A dense (unpaged) forward over an `engine.model.LlamaModel`'s weights, for profiling.

The serving forward goes through the paged cache and runs under inference mode; profilers
need attention probabilities, per-head outputs, masks and autograd instead. Every function
here takes an `attend(layer, q, k, v) -> o` callback (q `[T, Hq, D]`, k/v `[S, Hkv, D]`,
o `[T, Hq, D]`), so each profiler decides what attention does and what it records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def load_model(model: str):
    """(ModelConfig, LlamaModel, tokenizer) in fp32 on CPU, shared with engines in this process."""
    from headwise.engine.weights import load_model as load

    return load(model, "float32", "cpu")


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """`[S, Hkv, D]` -> `[S, Hq, D]`: query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True
) -> torch.Tensor:
    """SDPA over `[T, Hq, D]` queries and `[S, Hkv, D]` keys; `mask` `[T, S]` bool (True =
    visible) or None for plain causal attention with queries at the last T positions."""
    hq = q.shape[1]
    qh, kh, vh = (t.transpose(0, 1) for t in (q, expand_kv(k, hq), expand_kv(v, hq)))
    if mask is None and causal and q.shape[0] != k.shape[0]:
        mask = causal_mask(q.shape[0], k.shape[0])
    if mask is not None:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(0, 1)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal).transpose(0, 1)


def causal_mask(t: int, s: int) -> torch.Tensor:
    """`[t, s]` bool: query i (at position s - t + i) sees keys up to its own position."""
    return torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]


def streaming_mask(t: int, sink: int, recent: int) -> torch.Tensor:
    """`[t, t]` bool, docs/design.md "KV cache" mask semantics: j < sink or i - recent < j <= i."""
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= i) & ((j < sink) | (j > i - recent))


def probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, q_pos: torch.Tensor) -> torch.Tensor:
    """Attention probabilities `[Hq, T, S]` of queries at `q_pos` over keys at 0..S-1."""
    hq = q.shape[1]
    scores = torch.einsum("thd,shd->hts", q.float(), expand_kv(k, hq).float()) * scale
    scores.masked_fill_(torch.arange(k.shape[0])[None, None, :] > q_pos[None, :, None], float("-inf"))
    return scores.softmax(-1)


def forward(
    model, ids: torch.Tensor, attend: Attend | None = None, start: int = 0, logits: bool = False
) -> torch.Tensor:
    """Final normed hidden states `[T, hidden]` (or logits) of `ids` at positions start.."""
    x = model.embed_tokens(ids)
    positions = torch.arange(start, start + ids.shape[0])
    attend = attend or (lambda layer, q, k, v: attention(q, k, v))
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = a.qkv_proj(h).split([a.hq * a.d, a.hkv * a.d, a.hkv * a.d], dim=-1)
        t = ids.shape[0]
        q, k = model.rotary(positions, q.view(t, a.hq, a.d), k.view(t, a.hkv, a.d))
        o = attend(i, q, k, v.view(t, a.hkv, a.d))
        x = x + a.o_proj(o.reshape(t, a.hq * a.d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = model.norm(x)
    return model.lm_head(x).float() if logits else x


@dataclass
class DenseCache:
    """Rotated keys and values of every layer, `[S, Hkv, D]` each, for greedy decoding."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.k[0].shape[0] if self.k else 0


def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, DenseCache]:
    """Logits of the last prompt token and the cache of the whole prompt."""
    cache = DenseCache()

    def attend(layer, q, k, v):
        cache.k.append(k)
        cache.v.append(v)
        return attention(q, k, v)

    with torch.no_grad():
        hidden = forward(model, ids, attend)
        return model.lm_head(hidden[-1]).float(), cache


def decode_step(
    model, cache: DenseCache, token: int, record: Callable[[int, torch.Tensor], None] | None = None
) -> torch.Tensor:
    """Append one token, return its logits; `record(layer, probs [Hq, S])` sees its attention."""
    pos = cache.length
    scale = model.layers[0].self_attn.scale

    def attend(layer, q, k, v):
        cache.k[layer] = torch.cat([cache.k[layer], k])
        cache.v[layer] = torch.cat([cache.v[layer], v])
        p = probabilities(q, cache.k[layer], scale, torch.tensor([pos]))[:, 0]  # [Hq, S]
        if record is not None:
            record(layer, p)
        return torch.einsum("hs,shd->hd", p, expand_kv(cache.v[layer], q.shape[1]))[None]

    with torch.no_grad():
        return forward(model, torch.tensor([token]), attend, start=pos, logits=True)[-1]


def greedy(
    model,
    ids: list[int],
    max_tokens: int,
    stop: set[int] | None = None,
    record: Callable[[int, int, torch.Tensor], None] | None = None,
) -> list[int]:
    """Greedy continuation of `ids`. `record(token, layer, probs [Hq, S])` gets, for every
    generated token, the attention of the query that predicted it (the last prompt token
    for the first one, then each generated token)."""
    logits, cache = prefill(model, torch.tensor(ids))
    probs = _last_query_probs(model, cache, ids) if record is not None else []
    out: list[int] = []
    for step in range(max_tokens):
        tok = int(logits.argmax())
        if record is not None:
            for layer, p in enumerate(probs):
                record(tok, layer, p)
        out.append(tok)
        if (stop and tok in stop) or step + 1 == max_tokens:
            break
        probs = []
        logits = decode_step(model, cache, tok, (lambda layer, p: probs.append(p)) if record else None)  # noqa: B023
    return out


def _last_query_probs(model, cache: DenseCache, ids: list[int]) -> list[torch.Tensor]:
    """Attention `[Hq, S]` of the last prompt token in every layer, from the cached keys
    (the query is recomputed: prefill used SDPA, which does not return probabilities)."""
    scale = model.layers[0].self_attn.scale
    s = cache.length
    x_probs: list[torch.Tensor] = []

    def attend(layer, q, k, v):
        p = probabilities(q, cache.k[layer], scale, torch.tensor([s - 1]))[:, 0]
        x_probs.append(p)
        return torch.einsum("hs,shd->hd", p, expand_kv(cache.v[layer], q.shape[1]))[None]

    with torch.no_grad():
        forward(model, torch.tensor(ids[-1:]), attend, start=s - 1)
    return x_probs
