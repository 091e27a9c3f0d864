"""Which tokens and heads a request keeps when its prompt ends.

- `middle_scores`: SnapKV / Task-KV "middle activations": attention of the last `window`
  prompt queries to every prompt key, summed over the window, max-pooled along the
  sequence, reduced (max) over the query heads of each GQA group.
- `farthest_heads`: Task-KV heterogeneous heads: per layer, the KV heads whose outputs
  lie farthest (cosine distance) from the layer's semantic center (mean over heads).
  `head_distances` (per request, dynamic plans) compares each KV head's group outputs
  concatenated; `query_head_distances` (`profile taskkv`) compares query heads and keeps
  each group's farthest, which separates a group's one distinct head (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def middle_scores(
    q_win: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, scale: float, pool_kernel: int = 7
) -> torch.Tensor:
    """q_win `[W, Hq, D]` at positions `q_pos [W]`, prompt keys k `[P, Hkv, D]` (slot =
    position) -> scores `[Hkv, P]`."""
    w, hq, d = q_win.shape
    p, hkv, _ = k.shape
    g = hq // hkv
    qg = q_win.float().view(w, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, W, D]
    scores = torch.matmul(qg, k.float().permute(1, 2, 0)[:, None]) * scale  # [Hkv, G, W, P]
    future = torch.arange(p, device=q_pos.device)[None, :] > q_pos[:, None]
    scores.masked_fill_(future, float("-inf"))
    attn = scores.softmax(-1).sum(2)  # [Hkv, G, P]
    attn = F.max_pool1d(attn, pool_kernel, stride=1, padding=pool_kernel // 2)
    return attn.amax(1)


def head_distances(out_win: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Mean cosine distance of each KV head's output to the layer center: out_win
    `[W, Hq, D]` (attention outputs of the last prompt queries) -> `[Hkv]`."""
    w, hq, d = out_win.shape
    per_kv = out_win.float().reshape(w, num_kv_heads, hq // num_kv_heads * d)  # group outputs concatenated
    center = per_kv.mean(1, keepdim=True)
    return (1 - F.cosine_similarity(per_kv, center, dim=-1)).mean(0)


def query_head_distances(out_win: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """out_win `[W, Hq, D]` (attention outputs of the last prompt queries) -> `[Hkv]`: each
    query head's cosine distance to the mean of the layer's query-head outputs, averaged over
    the W queries, max over the query heads of each KV head's group."""
    hq = out_win.shape[1]
    out = out_win.float()
    per_q = (1 - F.cosine_similarity(out, out.mean(1, keepdim=True), dim=-1)).mean(0)
    return per_q.view(num_kv_heads, hq // num_kv_heads).max(1).values


def farthest_heads(distances: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask `[Hkv]`: the dynamic_full_count(ratio, Hkv) farthest heads, the count `plan show` and the memory accounting use."""
    from headwise.kvcache.plan_build import dynamic_full_count

    hkv = distances.numel()
    n = dynamic_full_count(ratio, hkv)
    keep = torch.zeros(hkv, dtype=torch.bool)
    keep[torch.topk(distances, n).indices] = True
    return keep
