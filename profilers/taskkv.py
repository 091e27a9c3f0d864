"""Task-KV offline (He et al. 2025, our reading): heads far from their layer's semantic center.

On each task prompt, per layer, every attention (query) head's output over the last
`window` prompt queries is compared to the layer's semantic center (the mean over the
layer's query heads) by cosine distance; distances are averaged over the queries and the
prompts, and a KV head scores the max over its GQA group (it must stay full if any head
reading it does), as retrieval scores reduce. The `ratio` farthest KV heads of the whole
model stay full, the rest get a `select` budget.

Why query heads: the 3 query heads of a SmolLM2 GQA group read the same values but attend
differently. Concatenating a group's outputs into one vector (what dynamic plans'
`selection.head_distances` does per request) averages a group's one distinct head away:
on SmolLM2 it ranks the retrieval head L18.2 78th-79th of 90, per query head 5th
(docs/benchmarks.md, "Profiled plans").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from headwise.kvcache.plan_build import plan_from_scores, plan_source, ratio_plan_name
from headwise.kvcache.plans import HeadSpec, Plan
from headwise.kvcache.selection import query_head_distances
from headwise.profilers.dense_forward import attention, forward


def read_task(path: str | Path, tokenizer, samples: int, max_tokens: int) -> list[list[int]]:
    """Up to `samples` prompts of a JSONL file, each cut to its last `max_tokens` tokens.
    A line holds {"prompt": TEXT} or {"prompt_ids": [ints]}; other fields are ignored."""
    from headwise.synthetic.prompts import encode_specials
    from headwise.synthetic.text import encode

    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(d, dict) and isinstance(d.get("prompt_ids"), list):
                ids = [int(t) for t in d["prompt_ids"]]
            elif isinstance(d, dict) and isinstance(d.get("prompt"), str):
                ids = encode_specials(tokenizer) + encode(tokenizer, d["prompt"])
            else:
                raise ValueError(f'{path}:{n}: expected {{"prompt": TEXT}} or {{"prompt_ids": [...]}}')
            if ids:
                prompts.append(ids[-max_tokens:])
            if len(prompts) == samples:
                break
    if not prompts:
        raise ValueError(f"{path}: no task samples")
    return prompts


def head_distance_scores(model, prompts: list[list[int]], window: int, progress: bool = True) -> torch.Tensor:
    """`query_head_distances` `[L, Hkv]` averaged over `prompts`."""
    cfg = model.cfg
    total = torch.zeros(cfg.num_layers, cfg.num_kv_heads)
    for ids in tqdm(prompts, desc="taskkv", unit="prompt", disable=not progress):

        def attend(layer, q, k, v):
            o = attention(q, k, v)
            total[layer] += query_head_distances(o[-window:], cfg.num_kv_heads)
            return o

        with torch.no_grad():
            forward(model, torch.tensor(ids), attend)
    return total / len(prompts)


def profile_taskkv(
    model,
    prompts: list[list[int]],
    ratio: float,
    rest: HeadSpec,
    window: int,
    name: str | None,
    task: str = "",
    progress: bool = True,
) -> tuple[Plan, str]:
    scores = head_distance_scores(model, prompts, window, progress)
    params = {
        "task": str(task),
        "samples": len(prompts),
        "window": window,
        "distance": "query_head_max",
        "mean_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
    }
    plan = plan_from_scores(
        model.cfg.shape,
        [[round(v, 6) for v in row] for row in scores.tolist()],
        ratio,
        rest,
        name or ratio_plan_name("taskkv", ratio),
        plan_source("taskkv", params),
    )
    return plan, f"{len(prompts)} task prompts of {params['mean_tokens']:g} tokens on average"
