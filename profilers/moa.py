"""MoA (Fu et al. 2024): elastic sink + band rules per head from attention influence.

Calibration: real text (the pydoc corpus) continued by the model itself; the LM loss on
those continuation tokens is back-propagated to every layer's attention output O, so
dL/dA = dL/dO V^T without keeping A in the graph. Influence of entry (i, j):
E_ij = -A_ij (dL/dA_ij - sum_k A_ik dL/dA_ik) / (1 - A_ij), the first-order loss change from
masking it with renormalisation. |E| of the non-sink entries is binned by distance i - j per
KV head (summed over its GQA group), so the cost of a rule of span S is the tail from S.
A rule is (alpha, beta): span alpha + beta * N for prompt length N.

Calibration data (`--data`): `needle` (the default: needle prompts in real text and the
model's own answer, so the loss measures what retrieval needs; the retrieval profiler's
prompts) or `text` (real text and the model's own continuation). MoA's recipe is data with
long-range dependencies answered by the model itself; a text continuation mostly depends on
the last few hundred tokens, and its plans lost to an equal-bytes window below density 0.65
(docs/benchmarks.md).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from tqdm import tqdm

from headwise.kvcache.moa_rules import plan_for_density, rules
from headwise.kvcache.plans import Plan
from headwise.profilers.dense_forward import attention, expand_kv, greedy

BIN = 16  # distance resolution of the influence histogram, in tokens
MAX_PROFILE_LENGTH = 2048  # longer --lengths reuse the longest profiled one, scaled (see rule_costs)


def calibration_ids(tokenizer, model, length: int, generate: int, index: int, seed: int) -> tuple[list[int], int]:
    """A window of real text of `length - generate` tokens continued greedily by the model;
    returns the ids and where the model's own tokens start."""
    from headwise.synthetic.text import corpus_ids

    corpus = corpus_ids(tokenizer)
    rng = random.Random(f"headwise-profile-moa:{seed}:{length}:{index}")
    n = length - generate
    start = rng.randrange(len(corpus) - n)
    prefix = list(corpus[start : start + n])
    return prefix + greedy(model, prefix, generate), n


DATA = ("text", "needle")


def needle_calibration(tokenizer, model, length: int, samples: int, seed: int) -> list[tuple[list[int], int]]:
    """Needle-in-a-haystack prompts (the retrieval profiler's, depths spread over `samples`)
    with the model's own greedy answer appended: the loss is on the answer, so the influence
    lands on the needle for the heads that retrieve it. Per prompt: the ids and where the
    answer starts."""
    from headwise.profilers.retrieval import ANSWER_SLACK, build_tests

    out = []
    for test in build_tests(tokenizer, [length], samples, seed):
        answer = greedy(model, test.prompt_ids, test.answer_tokens + ANSWER_SLACK)
        out.append((test.prompt_ids + answer, len(test.prompt_ids)))
    return out


def influence(model, ids: list[int], loss_from: int, sink: int) -> torch.Tensor:
    """|E| binned by distance `[L, Hkv, ceil(T / BIN)]` for one calibration sequence; the loss
    is the mean NLL of tokens loss_from.. (the model's own continuation)."""
    from headwise.profilers.dense_forward import forward

    cfg = model.cfg
    t = len(ids)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    outs: list[torch.Tensor] = []

    def attend(layer, q, k, v):
        o = attention(q, k, v)
        if not o.requires_grad:  # frozen weights: start the graph here
            o = o.detach().requires_grad_()
        saved.append((q.detach(), k.detach(), v.detach()))
        outs.append(o)
        return o

    x = torch.tensor(ids)
    with torch.enable_grad():
        logits = forward(model, x[:-1], attend, logits=False)
        logits = model.lm_head(logits[loss_from - 1 :]).float()
        loss = torch.nn.functional.cross_entropy(logits, x[loss_from:])
        grads = torch.autograd.grad(loss, outs)
    nbins = -(-t // BIN)
    out = torch.zeros(cfg.num_layers, cfg.num_kv_heads, nbins)
    tq = t - 1
    i_all = torch.arange(tq)
    j_all = torch.arange(tq)
    for layer, ((q, k, v), g) in enumerate(zip(saved, grads)):
        hq = q.shape[1]
        ke, ve = expand_kv(k, hq).float(), expand_kv(v, hq).float()
        hist = torch.zeros(hq, nbins)
        for lo in range(0, tq, 256):
            rows = i_all[lo : lo + 256]
            s = torch.einsum("thd,shd->hts", q[lo : lo + 256].float(), ke) * model.layers[layer].self_attn.scale
            future = j_all[None, :] > rows[:, None]
            a = s.masked_fill(future[None], float("-inf")).softmax(-1)  # [Hq, t, S]
            da = torch.einsum("thd,shd->hts", g[lo : lo + 256].float(), ve)
            e = (-a * (da - (a * da).sum(-1, keepdim=True)) / (1 - a).clamp_min(1e-6)).abs()
            dist = rows[:, None] - j_all[None, :]
            keep = (~future) & (j_all[None, :] >= sink)
            e = e * keep[None]
            idx = (dist.clamp_min(0) // BIN).expand(hq, -1, -1).reshape(hq, -1)
            hist.scatter_add_(1, idx, e.reshape(hq, -1))
        out[layer] = hist.view(cfg.num_kv_heads, hq // cfg.num_kv_heads, nbins).sum(1)
    return out


def rule_costs(hists: dict[int, torch.Tensor], lengths: list[int], rule_list: list[tuple[float, float]]) -> np.ndarray:
    """Cost `[L * Hkv, R]` of each rule summed over `lengths`: the influence mass at distances
    >= the rule's span. A length that was not profiled uses the longest profiled histogram
    with the span scaled by profiled / length (MoA's observation that spans grow with N)."""
    first = next(iter(hists.values()))
    heads = first.shape[0] * first.shape[1]
    cost = np.zeros((heads, len(rule_list)))
    for n in lengths:
        p = n if n in hists else max(hists)
        h = hists[p].reshape(heads, -1).double()
        total = h.sum(1, keepdim=True).clamp_min(1e-12)
        tail = (h.flip(1).cumsum(1).flip(1) / total).numpy()  # tail[:, b]: mass at distance >= b * BIN
        for k, (alpha, beta) in enumerate(rule_list):
            span = min(alpha + beta * n, n) * p / n
            b = int(np.ceil(span / BIN))
            cost[:, k] += tail[:, b] if b < tail.shape[1] else 0.0
    return cost / len(lengths)


def profile_moa(
    model,
    tokenizer,
    lengths: list[int],
    density: float,
    profile_length: int,
    samples: int,
    generate: int,
    sink: int,
    max_rules: int,
    seed: int,
    name: str | None,
    progress: bool = True,
    data: str = "needle",
) -> tuple[Plan, str]:
    if data not in DATA:
        raise ValueError(f"calibration data {data!r}: expected one of {', '.join(DATA)}")
    cfg = model.cfg
    profiled = sorted({min(n, MAX_PROFILE_LENGTH) for n in lengths} | {profile_length})
    hists: dict[int, torch.Tensor] = {}
    with tqdm(total=len(profiled) * samples, desc="moa influence", unit="text", disable=not progress) as bar:
        for n in profiled:
            if n <= generate + 16:
                raise ValueError(f"length {n} is too short for {generate} generated calibration tokens")
            if data == "needle":
                sequences = needle_calibration(tokenizer, model, n, samples, seed)
            else:
                sequences = [calibration_ids(tokenizer, model, n, generate, i, seed) for i in range(samples)]
            for ids, start in sequences:
                h = influence(model, ids, start, sink)
                hists[n] = hists.get(n, 0) + h / samples
                bar.update(1)
    cost = rule_costs(hists, lengths, rules())
    params = {
        "data": data,
        "lengths": lengths,
        "profiled_lengths": profiled,
        "samples": samples,
        "generate": generate,
        "sink": sink,
        "rules_per_layer": max_rules,
        "seed": seed,
        # one row per KV head, one column per rules() entry: what `plan ratio` re-solves
        "rule_costs": [[float(f"{c:.6g}") for c in row] for row in cost],
    }
    return plan_for_density(cfg.shape, params, density, name or f"moa-{density * 100:g}")
