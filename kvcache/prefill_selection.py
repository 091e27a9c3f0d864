"""Select heads with a bounded prefill peak: each chunk of the prompt keeps, per select head,
its sinks, the best `candidates` middle tokens and the last `recent` positions; the chunk
that ends the prompt chooses the final `select` tokens from them with the prompt's last
`window` queries, in the layer's forward, and writes the head's ring layout (docs/design.md,
"KV cache"). So no select head ever holds the whole prompt of a long request, and none
needs blocks beyond the ones it keeps.

A head's slots [0, keep) hold its kept tokens (sinks at their position, then candidates
and recent positions in position order), all visible to the next chunk, whose own K/V the
attention reads from the forward. Scores are SnapKV's middle activations
(kvcache/selection.py) over the keys the head holds plus the chunk's: a prompt the head can
hold whole (or one chunk) is scored exactly as the whole-prompt path scores it. Between chunks
a candidate is also kept for a small key norm (`candidate_ranks`), which needs no query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from headwise.kernels.kv_quant import dequantize, is_fp8, quantize
from headwise.kvcache.buffers import KVBuffers


@dataclass
class BoundedPrefill:
    """Per (layer, KV head) of one request, in the tables' column order: the slots a
    bounded select head holds (0: not one), its sink / select / recent budget, the middle
    candidates it keeps between chunks and its scoring window. Plain arrays: the step's
    inputs carry it to every tensor-parallel rank."""

    slots: np.ndarray
    sink: np.ndarray
    select: np.ndarray
    recent: np.ndarray
    candidates: np.ndarray
    window: np.ndarray
    prompt_len: int

    def kept(self, end: int) -> np.ndarray:
        """`[L, Hkv]` valid slots once positions [0, end) are written (end < prompt_len):
        budget.candidates_kept for every head."""
        middle = np.maximum(0, end - self.recent - self.sink)
        return (
            np.minimum(end, self.sink)
            + np.minimum(self.candidates, middle)
            + np.minimum(self.recent, np.maximum(0, end - self.sink))
        )

    def groups(self, layer: int, first_head: int, num_heads: int) -> list[HeadGroup]:
        """This rank's bounded heads of `layer` (local indices of columns [first_head,
        first_head + num_heads)), grouped by budget."""
        out: dict[tuple[int, ...], list[int]] = {}
        for h in range(num_heads):
            c = first_head + h
            if self.slots[layer, c] > 0:
                arrays = (self.slots, self.sink, self.select, self.recent, self.candidates, self.window)
                key = tuple(int(a[layer, c]) for a in arrays)
                out.setdefault(key, []).append(h)
        return [HeadGroup(heads, *key) for key, heads in out.items()]


@dataclass
class HeadGroup:
    heads: list[int]  # local KV head indices
    slots: int
    sink: int
    select: int
    recent: int
    candidates: int
    window: int

    def kept(self, end: int) -> int:
        middle = max(0, end - self.recent - self.sink)
        return min(end, self.sink) + min(self.candidates, middle) + min(self.recent, max(0, end - self.sink))


@dataclass
class ChunkSelection:
    """One sequence's prefill chunk in a step, for its bounded select heads."""

    table_row: int
    first: int  # first row of the chunk in the step's tokens
    start: int  # its first position
    count: int
    prompt_len: int
    groups: list[list[HeadGroup]]  # per layer
    # per layer, the window queries `[w, Hq, D]` earlier chunks computed (a window that
    # straddles chunks): read by the chunk that ends the prompt, extended by the others
    window_q: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.count


def select_in_chunk(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: list[ChunkSelection],
    buffers: KVBuffers,
    table: torch.Tensor,
    scale: float,
) -> None:
    """After layer `layer` attended and wrote the step's K/V: every chunk's bounded heads
    keep what they keep (q `[T, Hq, D]`, k / v `[T, Hkv, D]` this rank's heads, `table`
    `[R, Hkv, W]` the layer's block tables)."""
    ks, vs = buffers.scales(layer)
    g = q.shape[1] // k.shape[1]
    for c in chunks:
        keep_window_queries(c, layer, q)
        for group in c.groups[layer]:
            heads = torch.tensor(group.heads, device=q.device)
            qh = torch.arange(g, device=q.device)
            q_cols = (heads[:, None] * g + qh[None, :]).reshape(-1)
            _select_group(c, group, layer, q, k, v, heads, q_cols, buffers, table, scale, ks, vs)


def keep_window_queries(c: ChunkSelection, layer: int, q: torch.Tensor) -> None:
    """A chunk before the prompt's last that holds scoring-window positions keeps their
    queries (every head's window ends at the prompt's end; the widest is kept)."""
    if c.end >= c.prompt_len or not c.groups[layer]:
        return
    w = max(grp.window for grp in c.groups[layer])
    lo = max(c.start, c.prompt_len - w)
    if lo >= c.end:
        return
    part = q[c.first + lo - c.start : c.first + c.count]
    old = c.window_q[layer]
    c.window_q[layer] = part.clone() if old is None or lo == c.prompt_len - w else torch.cat([old, part])


def _select_group(
    c: ChunkSelection,
    grp: HeadGroup,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    q_cols: torch.Tensor,
    buffers: KVBuffers,
    table: torch.Tensor,
    scale: float,
    ks: torch.Tensor | None,
    vs: torch.Tensor | None,
) -> None:
    bs, d = buffers.k.shape[1], buffers.k.shape[2]
    start, end, p = c.start, c.end, c.prompt_len
    final = end >= p
    sink, h, device = grp.sink, len(grp.heads), q.device
    # entries: the slots [0, n0) the heads hold, then the chunk; both in position order
    n0 = grp.kept(start)
    idx = torch.arange(n0, device=device)
    blocks = table[c.table_row, heads, : -(-grp.slots // bs)].long()  # [H', blocks]
    held = blocks[:, idx // bs] * bs + idx % bs  # [H', n0]
    k_raw = torch.cat([buffers.k.view(-1, d)[held], _stored(k, c, heads, ks, buffers.k.dtype)], 1)
    v_raw = torch.cat([buffers.v.view(-1, d)[held], _stored(v, c, heads, vs, buffers.v.dtype)], 1)
    chunk_pos = torch.arange(start, end, device=device)
    pos = torch.cat([buffers.pos.view(-1)[held].long(), chunk_pos.expand(h, -1)], 1)  # [H', N]
    lo = min(sink, end)
    if final:  # select_range: the middle before the ring, `select` of it kept
        hi = max(lo, p - grp.recent)
        keep_mid = min(grp.select, hi - lo)
    else:
        hi = max(lo, end - grp.recent)
        keep_mid = grp.candidates
    middle = (pos >= lo) & (pos < hi)
    entry_of = torch.full((h, end), -1, dtype=torch.long, device=device)
    entry_of.scatter_(1, pos, torch.arange(pos.shape[1], device=device).expand(h, -1))
    if int(middle.sum(1).max()) > keep_mid:
        scores = _scores(c, grp, layer, q, q_cols, k_raw, pos, end, scale, ks, heads, final)  # [H', end]
        ranked = scores[:, lo:hi].masked_fill(entry_of[:, lo:hi] < 0, float("-inf"))
        picked = torch.topk(ranked, keep_mid, dim=1).indices.sort(1).values + lo  # positions, in order
        # a head holding fewer middle tokens than it keeps keeps them all (the rest: -inf, absent)
        chosen = [e[e >= 0] for e in entry_of.gather(1, picked)]
    else:
        chosen = [torch.nonzero(middle[i]).flatten() for i in range(h)]
    for i in range(h):
        rec = torch.nonzero(pos[i] >= hi).flatten()
        src = torch.cat([chosen[i], rec])
        n_mid = len(chosen[i])
        if final:  # sinks stay, chosen middle after them, the ring after those
            ring_at = sink + n_mid + (pos[i, rec] - sink) % max(grp.recent, 1)
            dst = torch.cat([sink + torch.arange(n_mid, device=device), ring_at])
        else:
            dst = lo + torch.arange(len(src), device=device)
        flat = blocks[i, dst // bs] * bs + dst % bs
        _write(buffers.k, flat, k_raw[i, src])
        _write(buffers.v, flat, v_raw[i, src])
        buffers.pos.view(-1)[flat] = pos[i, src].to(buffers.pos.dtype)


def _stored(x: torch.Tensor, c: ChunkSelection, heads: torch.Tensor, scale, dtype) -> torch.Tensor:
    """The chunk's K or V of `heads` as the cache stores them: `[H', n, D]` in `dtype`."""
    part = x[c.first : c.first + c.count].index_select(1, heads)  # [n, H', D]
    if is_fp8(dtype):
        assert scale is not None, "an fp8 cache needs its scales"
        part = quantize(part, scale[heads], dtype)
    return part.to(dtype).transpose(0, 1)


def _write(cache: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> None:
    d = cache.shape[-1]
    if is_fp8(cache.dtype):  # no fp8 index_put on the CPU: move the bytes
        cache.view(torch.uint8).view(-1, d)[flat] = rows.view(torch.uint8)
    else:
        cache.view(-1, d)[flat] = rows


def _scores(
    c: ChunkSelection,
    grp: HeadGroup,
    layer: int,
    q: torch.Tensor,
    q_cols: torch.Tensor,
    k_raw: torch.Tensor,
    pos: torch.Tensor,
    end: int,
    scale: float,
    ks: torch.Tensor | None,
    heads: torch.Tensor,
    final: bool,
) -> torch.Tensor:
    """Middle-token scores `[H', end]` of the group's heads by position: the prompt's last
    `window` queries at its end; else `candidate_ranks` of the chunk's own last `window`
    queries' scores and the keys' norms."""
    if final:
        w = min(grp.window, c.prompt_len)
        lo = max(c.start, c.prompt_len - w)
        parts = [q[c.first + lo - c.start : c.first + c.count]]
        prev = c.window_q[layer] if c.window_q else None
        if lo > c.prompt_len - w and prev is not None:
            parts.insert(0, prev[-(lo - (c.prompt_len - w)) :])
        q_win = torch.cat(parts)
    else:
        w = min(grp.window, c.count)
        q_win = q[c.first + c.count - w : c.first + c.count]
    q_win = q_win.index_select(1, q_cols)
    q_pos = torch.arange(end - q_win.shape[0], end, device=q.device)
    keys = dequantize(k_raw, ks[heads] if ks is not None else None, 0)
    scores = scattered_scores(q_win, q_pos, keys, pos, end, scale)
    return scores if final else candidate_ranks(scores, keys, pos)


def candidate_ranks(scores: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A chunk before the prompt's last ranks its middle tokens `[H', end]` by the better of
    two ranks: the chunk's last queries' scores, and a low L2 norm of the token's key (keys of
    small norm draw attention: Devoto et al. 2024). The second needs no query, so a token the
    question will look for later (a needle in the first chunk) can stay a candidate although
    the chunk's tail does not attend to it. At 4096 tokens in 2048-token chunks, margin 2, 50
    needle samples per task: duo-10 97% of full's accuracy against 80% with the scores alone
    (docs/benchmarks.md)."""
    low_norm = torch.full_like(scores, float("-inf")).scatter_(1, pos, -keys.float().norm(dim=-1))
    return torch.maximum(_ranks(scores), _ranks(low_norm))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Each entry's rank along dim 1 (0: the smallest), ties broken by position."""
    return x.argsort(dim=1, stable=True).argsort(dim=1, stable=True).float()


def scattered_scores(
    q_win: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    k_pos: torch.Tensor,
    length: int,
    scale: float,
    pool_kernel: int = 7,
) -> torch.Tensor:
    """selection.middle_scores over keys that need not be every position: q_win `[W, Hq, D]`
    at `q_pos [W]`, keys k `[Hkv, N, D]` at positions `k_pos [Hkv, N]` (< length) ->
    scores `[Hkv, length]` (0 where a head holds no key before the pooling). With every
    position's key in order it computes what middle_scores does."""
    w, hq, d = q_win.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    qg = q_win.float().view(w, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, W, D]
    scores = torch.matmul(qg, k.float().transpose(1, 2)[:, None]) * scale  # [Hkv, G, W, N]
    future = k_pos[:, None, None, :] > q_pos[None, None, :, None]
    scores.masked_fill_(future, float("-inf"))
    attn = scores.softmax(-1).sum(2)  # [Hkv, G, N]
    dense = attn.new_zeros(hkv, g, length).scatter_(2, k_pos[:, None, :].expand(hkv, g, n), attn)
    dense = F.max_pool1d(dense, pool_kernel, stride=1, padding=pool_kernel // 2)
    return dense.amax(1)
