"""Brute-force reference for head budgets: the engine's weights run densely over the whole
sequence with the docs/design.md mask materialised per (layer, kv_head, query, key).

Mask of a bounded head: key j visible to query i iff j <= i and (j < sink or
i - recent < j or j is selected). select / dynamic heads see everything while the prompt
is processed and their budget only afterwards (selection happens when the prompt ends).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headwise.kvcache.budget import resolve_budget, select_range
from headwise.kvcache.plans import Plan
from headwise.kvcache.selection import farthest_heads, head_distances, middle_scores


def _layer_qkv(layer, x, positions, rotary, cfg):
    attn = layer.self_attn
    t = x.shape[0]
    h = layer.input_layernorm(x)
    q, k, v = attn.qkv_proj(h).split([attn.hq * attn.d, attn.hkv * attn.d, attn.hkv * attn.d], dim=-1)
    q, k = rotary(positions, q.view(t, attn.hq, attn.d), k.view(t, attn.hkv, attn.d))
    return q, k, v.view(t, attn.hkv, attn.d)


def _attend(q, k, v, visible):
    """q [T, Hq, D], k/v [T, Hkv, D], visible [Hkv, T, T] -> [T, Hq, D]."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.view(t, hkv, g, d).permute(1, 2, 0, 3)
    scores = torch.matmul(qg, k.permute(1, 2, 0)[:, None]) * d**-0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.matmul(scores.softmax(-1), v.permute(1, 0, 2)[:, None])  # [Hkv, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(t, hq, d)


@torch.no_grad()
def dense_logprobs(engine, plan: Plan, tokens: list[int], prompt_len: int, max_tokens: int) -> torch.Tensor:
    """Log-probabilities `[T, V]` of every position of `tokens` under `plan`'s masks."""
    model, cfg = engine.model, engine.model_config
    t = len(tokens)
    pos = torch.arange(t)
    i, j = pos[:, None], pos[None, :]
    causal = j <= i
    x = model.embed_tokens(torch.tensor(tokens))
    ctx = prompt_len + max_tokens
    for li, layer in enumerate(model.layers):
        q, k, v = _layer_qkv(layer, x, pos, model.rotary, cfg)
        full_out = _attend(q, k, v, causal.expand(cfg.num_kv_heads, t, t))
        visible = causal.expand(cfg.num_kv_heads, t, t).clone()
        if plan.dynamic is not None:
            specs = [plan.dynamic.rest] * cfg.num_kv_heads
            w = plan.dynamic.rest.window
            keep_full = farthest_heads(
                head_distances(full_out[prompt_len - w : prompt_len], cfg.num_kv_heads), plan.dynamic.ratio
            )
        else:
            specs = plan.heads[li]
            keep_full = torch.tensor([s.kind == "full" for s in specs])
        for h, spec in enumerate(specs):
            if keep_full[h]:
                continue
            b = resolve_budget(spec, prompt_len, ctx)
            allowed = (j < b.sink) | (j > i - b.recent)
            if spec.kind == "select":
                w = spec.window
                sc = middle_scores(
                    q[prompt_len - w : prompt_len],
                    torch.arange(prompt_len - w, prompt_len),
                    k[:prompt_len],
                    cfg.head_dim**-0.5,
                )[h]
                lo, hi, n = select_range(b, prompt_len)
                chosen = torch.zeros(t, dtype=torch.bool)
                if n:
                    chosen[torch.topk(sc[lo:hi], n).indices + lo] = True
                allowed = allowed | chosen[None, :] | (i < prompt_len)  # full during the prompt
            visible[h] &= allowed
        out = _attend(q, k, v, visible)
        x = x + layer.self_attn.o_proj(out.reshape(t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return F.log_softmax(model.lm_head(model.norm(x)).float(), dim=-1)
