"""What the torch references share to read a sequence's cached slots: block gathers, the
positions of the slots (a released block's hidden), the bounded-head mask over cached slots
and inside a chunk, the softmax-times-V core with its log-sum-exp, and the merge of two
partial softmax states. The contract they implement: kernels/reference.py."""

from __future__ import annotations

import torch

from headwise.kernels.kv_quant import dequantize


def gather_slots(cache: torch.Tensor, tables: torch.Tensor, nblocks: int) -> torch.Tensor:
    """`[S, Hkv, nblocks * bs, ...]` view of the slots named by `tables[:, :, :nblocks]`."""
    idx = tables[:, :, :nblocks].long()
    # index_select of whole blocks, not advanced indexing: a plain row copy, 2.7x faster on
    # the CPU for a decode batch's K (16 sequences x 3 heads x 1008 slots). A released block
    # (-1, a window head's past) reads block 0; its slots are hidden by `gather_positions`.
    g = cache.index_select(0, idx.clamp(min=0).reshape(-1))  # [S * Hkv * nblocks, bs, ...]
    return g.view(idx.shape[0], idx.shape[1], nblocks * cache.shape[1], *cache.shape[2:])


NO_POSITION = -(2**30)  # far outside any window: a released block's slots stay invisible


def gather_positions(pos_cache: torch.Tensor, tables: torch.Tensor, nblocks: int) -> torch.Tensor:
    """`gather_slots` of the slot positions `[S, Hkv, nblocks * bs]` (long), a released block's
    slots at `NO_POSITION` so no recency test can see them."""
    pos = gather_slots(pos_cache, tables, nblocks).long()
    released = (tables[:, :, :nblocks] < 0).repeat_interleave(pos_cache.shape[1], dim=-1)
    return pos.masked_fill_(released, NO_POSITION)


def softmax_av(scores: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype):
    """Masked (-inf) scores `[..., N]` and values `[..., N, D]` -> (out, lse)."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])
    out = torch.matmul(p.to(v.dtype), v)
    return out.to(out_dtype), lse


def cached_keys(k_cache, v_cache, pos_cache, table, lengths, keep, recent, q_pos, dtype, k_scale=None, v_scale=None):
    """One sequence's cached slots and which of them each query may see (the paged mask).

    table `[1, Hkv, max_blocks]`, lengths / keep / recent `[Hkv]`, q_pos `[n]`. Returns
    k, v `[Hkv, N, D]` in `dtype` and visible `[Hkv, n, N]`: slot r is visible iff it is
    written (r < length) and either kept for good (sink or selected, r < keep) or its
    position is inside the query's recent window. None when nothing is cached."""
    n_valid = int(lengths.max()) if lengths.numel() else 0
    if n_valid == 0:
        return None
    bs = k_cache.shape[1]
    nb = -(-n_valid // bs)
    k = dequantize(gather_slots(k_cache, table, nb)[0], k_scale, 0).to(dtype)
    v = dequantize(gather_slots(v_cache, table, nb)[0], v_scale, 0).to(dtype)
    kpos = gather_positions(pos_cache, table, nb)[0]  # [Hkv, N]
    r = torch.arange(nb * bs, device=k.device)[None, None, :]
    qp = q_pos.long()[None, :, None]
    visible = (r < lengths.long()[:, None, None]) & (
        (r < keep.long()[:, None, None]) | (kpos[:, None, :] > qp - recent.long()[:, None, None])
    )
    return k, v, visible


def chunk_visible(p: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """`[Hkv, n, n]`: key j of a chunk at positions `p` visible to query i iff j <= i and
    (j < sink or j > i - recent), per head."""
    qi, kj = p.long()[:, None], p.long()[None, :]
    win = (kj[None] < sink.long()[:, None, None]) | (kj[None] > qi[None] - recent.long()[:, None, None])
    return (kj <= qi)[None] & win


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax states over disjoint key sets: `[..., D]`, `[...]`."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe)[..., None]
    w2 = torch.exp(lse2 - safe)[..., None]
    out = o1.float() * w1 + o2.float() * w2
    return out.to(o1.dtype), lse


def flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None = None
):
    """torch's fused CPU flash attention with its log-sum-exp: `[B, H, n, D]` (GQA: fewer K/V
    heads) -> out `[B, Hq, n, D]`, lse `[B, Hq, n]` fp32; causal is aligned top-left; `mask`
    is additive, in q's dtype, broadcast to `[B, Hq, n, N]` (a row it hides wholly: output 0)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
