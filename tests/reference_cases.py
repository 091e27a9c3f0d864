"""Shared by the torch-reference tests (tests/test_kernels_reference*.py): the float64 dense
oracle with the docs/design.md mask, random workloads (sequence lengths, per-head budgets)
and paged caches built with sink + ring slot mappings."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from headwise.kernels import reference as ref
from headwise.kernels.layout import UNBOUNDED
from headwise.kernels.triton_cases import allocate, head_capacity, slot_mapping

ATOL = RTOL = 1e-5
D = 16
BLOCK = 4
SETTINGS = settings(max_examples=25, deadline=None)


def dense_attention(q, qpos, k, v, kpos, sink, recent, scale):
    """q [n, Hq, D] at positions qpos, one sequence's k / v [m, Hkv, D] at kpos."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k.double().repeat_interleave(g, 1)) * scale
    i, j = qpos[:, None].long(), kpos[None, :].long()
    s = sink.long().repeat_interleave(g)[:, None, None]
    r = recent.long().repeat_interleave(g)[:, None, None]
    visible = (j <= i)[None] & ((j[None] < s) | (j[None] > i[None] - r))
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [Hq, n]
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    out = torch.einsum("hnm,mhd->nhd", p, v.double().repeat_interleave(g, 1))
    return out, lse.T


def assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL, rtol=RTOL, equal_nan=False)


@st.composite
def workloads(draw, max_len=24):
    """Sequences with random lengths and a per-(seq, KV head) full or sink + window budget."""
    s = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 3, 4]))
    lens = draw(st.lists(st.integers(0, max_len), min_size=s, max_size=s))
    sink = torch.zeros(s, hkv, dtype=torch.int32)
    recent = torch.full((s, hkv), UNBOUNDED, dtype=torch.int32)
    for a in range(s):
        for h in range(hkv):
            if draw(st.booleans()):
                sink[a, h] = draw(st.integers(0, 3))
                recent[a, h] = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    return lens, g, sink, recent, seed


def make_tokens(lens, hkv, g, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = torch.randn(n, hkv * g, D, generator=gen)
    k = torch.randn(n, hkv, D, generator=gen)
    v = torch.randn(n, hkv, D, generator=gen)
    return q, k, v, gen


def new_cache(lens, sink, recent, gen, extra=0):
    caps = torch.tensor(
        [
            [head_capacity(int(sink[s, h]), int(recent[s, h]), n + extra) for h in range(sink.shape[1])]
            for s, n in enumerate(lens)
        ]
    )
    return allocate(caps, BLOCK, D, torch.float32, "cpu", gen)


def write_history(cache, k, v, lens, sink, recent):
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    ref.kv_write(k, v, pos, slot_mapping(cache, pos, seq, sink, recent), cache.k_cache, cache.v_cache, cache.pos_cache)


def bounds(lens):
    return [sum(lens[:s]) for s in range(len(lens) + 1)]
