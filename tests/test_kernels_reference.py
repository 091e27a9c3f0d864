"""The torch references against plain dense attention with the docs/design.md mask.

The oracle materialises, per sequence and KV head, the mask "key j is visible to query i
iff j <= i and (j < sink or j > i - recent)" over the full, unpaged K/V history, in
float64. The references run in float32 on paged caches built with sink + ring slot
mappings (so slots wrap and their positions are unsorted); tolerance: atol = rtol = 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from headwise.kernels import reference as ref
from headwise.kernels.layout import UNBOUNDED
from headwise.kernels.triton_cases import (
    allocate,
    decode_args,
    keep_of,
    position_aligned_cache,
    prefill_in_chunks,
    rows_of,
    slot_mapping,
)
from tests.reference_cases import (
    BLOCK,
    SETTINGS,
    D,
    assert_close,
    bounds,
    dense_attention,
    make_tokens,
    new_cache,
    workloads,
    write_history,
)


@SETTINGS
@given(workloads())
def test_decode_over_ring_cache_equals_dense_window_attention(w):
    """The newest token, written first, sees exactly what the ring kept."""
    lens, g, sink, recent, seed = w
    hkv = sink.shape[1]
    q, k, v, gen = make_tokens(lens, hkv, g, seed)
    cache = new_cache(lens, sink, recent, gen)
    write_history(cache, k, v, lens, sink, recent)
    b = bounds(lens)
    last = torch.tensor([max(b[s + 1] - 1, 0) for s in range(len(lens))])
    q_pos = torch.tensor([max(n - 1, 0) for n in lens])
    out, lse = ref.paged_decode(
        *decode_args(cache, q[last] if len(q) else torch.zeros(len(lens), hkv * g, D), q_pos, sink, recent, 0.3)
    )
    for s, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[s] == 0) and torch.all(lse[s] == float("-inf"))
            continue
        rows = slice(b[s], b[s + 1])
        o, l = dense_attention(
            q[last[s : s + 1]], torch.tensor([n - 1]), k[rows], v[rows], torch.arange(n), sink[s], recent[s], 0.3
        )
        assert_close(out[s], o[0])
        assert_close(lse[s], l[0])


@SETTINGS
@given(workloads(), st.integers(1, 8))
def test_prefix_over_cache_equals_dense_attention_to_cached_tokens(w, chunk):
    """paged_prefix over the ring (sorted or not) = dense masked attention to the tokens before the chunk."""
    lens, g, sink, recent, seed = w
    hkv = sink.shape[1]
    q, k, v, gen = make_tokens([n + chunk for n in lens], hkv, g, seed)
    cache = new_cache(lens, sink, recent, gen)
    b = bounds([n + chunk for n in lens])
    hist = torch.cat([torch.arange(b[s], b[s] + n) for s, n in enumerate(lens)])
    write_history(cache, k[hist], v[hist], lens, sink, recent)
    rows = torch.cat([torch.arange(b[s] + n, b[s + 1]) for s, n in enumerate(lens)])
    q_pos = torch.cat([torch.arange(n, n + chunk) for n in lens])
    q_seq = torch.arange(len(lens)).repeat_interleave(chunk)
    out, lse = ref.paged_prefix(
        q[rows],
        q_pos,
        q_seq,
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
        cache.block_tables,
        rows_of(cache),
        cache.lengths,
        keep_of(cache, sink),
        recent,
        0.3,
    )
    for s, n in enumerate(lens):
        mine = q_seq == s
        keys = slice(b[s], b[s] + n)
        o, l = dense_attention(q[rows][mine], q_pos[mine], k[keys], v[keys], torch.arange(n), sink[s], recent[s], 0.3)
        assert_close(out[mine], torch.nan_to_num(o))
        assert_close(lse[mine], l)


@SETTINGS
@given(workloads(), st.integers(0, 30))
def test_sink_window_prefill_equals_dense_masked_attention(w, first_pos):
    """In-chunk attention, also for a chunk that starts after the sinks (first_pos > 0)."""
    lens, g, sink, recent, seed = w
    q, k, v, _ = make_tokens(lens, sink.shape[1], g, seed)
    b = bounds(lens)
    pos = torch.cat([torch.arange(first_pos, first_pos + n) for n in lens])
    out, lse = ref.sink_window_prefill(q, k, v, pos, torch.tensor(b), sink, recent, 0.3)
    for s in range(len(lens)):
        rows = slice(b[s], b[s + 1])
        o, l = dense_attention(q[rows], pos[rows], k[rows], v[rows], pos[rows], sink[s], recent[s], 0.3)
        assert_close(out[rows], o)
        assert_close(lse[rows], l)


@SETTINGS
@given(st.integers(1, 12), st.integers(0, 12), st.integers(0, 2**16))
def test_merge_states_equals_attention_over_the_union(n1, n2, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, D, generator=gen)
    k = torch.randn(n1 + n2, 2, D, generator=gen)
    v = torch.randn(n1 + n2, 2, D, generator=gen)
    full = torch.full((2,), UNBOUNDED)
    qpos = torch.full((3,), n1 + n2)

    def part(sl):
        o, l = dense_attention(q, qpos, k[sl], v[sl], torch.arange(n1 + n2)[sl], full * 0, full, 0.3)
        return torch.nan_to_num(o).float(), l.float()

    out, lse = ref.merge_states(*part(slice(0, n1)), *part(slice(n1, None)))
    o, l = dense_attention(q, qpos, k, v, torch.arange(n1 + n2), full * 0, full, 0.3)
    assert_close(out, o)
    assert_close(lse, l)


def test_merge_of_two_empty_states_is_zero_with_lse_minus_inf():
    o = torch.randn(2, 3, D)
    lse = torch.full((2, 3), float("-inf"))
    out, l = ref.merge_states(o, lse, o, lse)
    assert torch.all(out == 0) and torch.all(l == float("-inf"))


def test_decode_skips_released_blocks_of_a_window_head():
    """A window head's blocks that left its window are released (-1 in its table). Block 0
    and the pool's last block hold positions that would be inside the window: neither may be
    read through a -1 entry (the gather clamps the index; the mask hides those slots)."""
    bs, d, newest, recent = 4, D, 11, 4
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(4, bs, d, generator=gen)
    v_cache = torch.randn(4, bs, d, generator=gen)
    pos_cache = torch.tensor([[8, 9, 10, 11], [4, 5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]], dtype=torch.int32)
    tables = torch.tensor([[[-1, -1, 2]]], dtype=torch.int32)  # positions 0-7 released
    q = torch.randn(1, 1, d, generator=gen)
    one = torch.ones(1, 1, dtype=torch.int32)
    out, lse = ref.paged_decode(
        q,
        k_cache,
        v_cache,
        pos_cache,
        tables,
        torch.zeros(1, dtype=torch.int32),
        one * (newest + 1),
        one * 0,
        one * recent,
        torch.tensor([newest], dtype=torch.int32),
        0.3,
    )
    scores = (k_cache[2] @ q[0, 0]) * 0.3  # only block 2's four slots are visible
    w = torch.softmax(scores, dim=0)
    assert_close(out[0, 0], w @ v_cache[2])
    assert_close(lse[0, 0], torch.logsumexp(scores, dim=0))


@SETTINGS
@given(workloads(max_len=30), st.integers(1, 9))
def test_chunked_prefill_equals_unchunked_attention_with_ring_wraparound(w, chunk):
    """The chunk size does not change any output, even after the rings wrapped mid-prompt."""
    lens, g, sink, recent, seed = w
    hkv = sink.shape[1]
    q, k, v, gen = make_tokens(lens, hkv, g, seed)
    cache = new_cache(lens, sink, recent, gen)
    out, lse = prefill_in_chunks(ref, cache, q, k, v, lens, sink, recent, chunk, 0.3)
    b = bounds(lens)
    for s, n in enumerate(lens):
        rows = slice(b[s], b[s + 1])
        o, l = dense_attention(q[rows], torch.arange(n), k[rows], v[rows], torch.arange(n), sink[s], recent[s], 0.3)
        assert_close(out[rows], o)
        assert_close(lse[rows], l)


@SETTINGS
@given(workloads(max_len=20), st.integers(1, 6), st.integers(1, 5))
def test_decode_after_chunked_prefill_equals_dense_attention(w, chunk, steps):
    """Prefill in chunks, then decode `steps` tokens, each written before it attends."""
    lens, g, sink, recent, seed = w
    lens = [n + 1 for n in lens]  # decode needs a prompt
    hkv = sink.shape[1]
    total = [n + steps for n in lens]
    q, k, v, gen = make_tokens(total, hkv, g, seed)
    cache = new_cache(lens, sink, recent, gen, extra=steps)
    b = bounds(total)
    prompt = torch.cat([torch.arange(b[s], b[s] + n) for s, n in enumerate(lens)])
    prefill_in_chunks(ref, cache, q[prompt], k[prompt], v[prompt], lens, sink, recent, chunk, 0.3)
    seqs = torch.arange(len(lens))
    for step in range(steps):
        pos = torch.tensor(lens) + step
        rows = torch.tensor(b[:-1]) + pos
        ref.kv_write(
            k[rows],
            v[rows],
            pos,
            slot_mapping(cache, pos, seqs, sink, recent),
            cache.k_cache,
            cache.v_cache,
            cache.pos_cache,
        )
        out, lse = ref.paged_decode(*decode_args(cache, q[rows], pos, sink, recent, 0.3))
        for s in range(len(lens)):
            keys = slice(b[s], int(rows[s]) + 1)
            o, l = dense_attention(
                q[rows[s : s + 1]],
                pos[s : s + 1],
                k[keys],
                v[keys],
                torch.arange(int(pos[s]) + 1),
                sink[s],
                recent[s],
                0.3,
            )
            assert_close(out[s], o[0])
            assert_close(lse[s], l[0])


@SETTINGS
@given(workloads(max_len=60), st.sampled_from([4, 8]))
def test_decode_over_position_aligned_window_blocks_masks_expired_slots(w, block_size):
    """The engine's window layout (sink blocks, then the blocks overlapping the window, the
    oldest possibly holding positions that left it) = dense sink + window attention."""
    lens, g, sink, recent, seed = w
    newest = [max(n, 1) - 1 for n in lens]
    gen = torch.Generator().manual_seed(seed)
    cache, k_all, v_all = position_aligned_cache(newest, sink, recent, block_size, D, torch.float32, "cpu", gen)
    hkv = sink.shape[1]
    q = torch.randn(len(lens), hkv * g, D, generator=gen)
    keep = torch.minimum(sink, cache.lengths)
    out, lse = ref.paged_decode(
        q,
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
        cache.block_tables,
        rows_of(cache),
        cache.lengths,
        keep,
        recent,
        torch.tensor(newest),
        0.3,
    )
    for s, p in enumerate(newest):
        o, l = dense_attention(
            q[s : s + 1],
            torch.tensor([p]),
            k_all[s, : p + 1],
            v_all[s, : p + 1],
            torch.arange(p + 1),
            sink[s],
            recent[s],
            0.3,
        )
        assert_close(out[s], o[0])
        assert_close(lse[s], l[0])


def test_full_head_decode_matches_softmax_formula():
    """A hand-checked case: one full head, two keys, exact softmax weights."""
    cache = allocate(torch.tensor([[2]]), BLOCK, D, torch.float32, "cpu", torch.Generator().manual_seed(0))
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    k = torch.zeros(2, 1, D)
    k[1, 0, 0] = math.log(3.0)  # scores 0 and log 3 -> weights 1/4, 3/4
    v = torch.zeros(2, 1, D)
    v[0, 0, 1], v[1, 0, 1] = 4.0, 8.0
    pos = torch.arange(2)
    one = torch.zeros(1, 1, dtype=torch.int32)
    ref.kv_write(
        k,
        v,
        pos,
        slot_mapping(cache, pos, torch.zeros(2, dtype=torch.long), one, one + UNBOUNDED),
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
    )
    out, lse = ref.paged_decode(*decode_args(cache, q, torch.tensor([1]), one, one + UNBOUNDED, 1.0))
    assert out[0, 0, 1].item() == pytest.approx(7.0, abs=1e-6)
    assert lse[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-6)
