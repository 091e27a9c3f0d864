"""Compiled Triton kernels on CUDA against the torch references, at serving-like shapes.

Same comparisons as tests/test_kernels_triton.py, bigger: thousands of tokens, the
default split planning (plus a forced fine split), Llama-3-8B and SmolLM2 head layouts.
Tolerances: fp32 atol = rtol = 1e-4 (IEEE dots, longer sums), fp16 5e-3, bf16 2e-2;
lse 1e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: the kernels would not be compiled", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

from headwise.kernels import reference as ref  # noqa: E402
from headwise.kernels import triton_decode  # noqa: E402
from headwise.kernels import triton_ops as tri  # noqa: E402
from headwise.kernels.layout import UNBOUNDED  # noqa: E402
from headwise.kernels.triton_cases import (  # noqa: E402
    allocate,
    decode_args,
    head_capacity,
    keep_of,
    prefill_in_chunks,
    rows_of,
    slot_mapping,
)

DEV = torch.device("cuda")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SCALE = 0.1
# dtype, head_dim, block_size, kv_heads, group
COMBOS = [
    (torch.bfloat16, 128, 16, 8, 4),  # Llama-3-8B
    (torch.float16, 64, 32, 3, 3),  # SmolLM2-135M
    (torch.float32, 128, 32, 4, 1),
    (torch.bfloat16, 64, 16, 2, 3),
]
IDS = [f"{str(c[0])[6:]}-d{c[1]}-bs{c[2]}-h{c[3]}-g{c[4]}" for c in COMBOS]


def assert_state_close(actual, expected, dtype):
    (o, lse), (o_ref, lse_ref) = actual, expected
    torch.testing.assert_close(o.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=1e-3)


def budgets(num_seqs: int, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Even KV heads full, odd heads sink 64 + window 256 (sink 4 + window 31 on some sequences)."""
    sink = torch.zeros(num_seqs, hkv, dtype=torch.int32)
    recent = torch.full((num_seqs, hkv), UNBOUNDED, dtype=torch.int32)
    sink[:, 1::2], recent[:, 1::2] = 64, 256
    sink[1::2, 1::2], recent[1::2, 1::2] = 4, 31
    return sink.to(DEV), recent.to(DEV)


def ring_cache(lens, dtype, head_dim, block_size, hkv, seed=0, extra=0):
    gen = torch.Generator().manual_seed(seed)
    sink, recent = budgets(len(lens), hkv)
    caps = torch.tensor(
        [[head_capacity(int(sink[s, h]), int(recent[s, h]), n + extra) for h in range(hkv)] for s, n in enumerate(lens)]
    )
    cache = allocate(caps, block_size, head_dim, dtype, DEV, gen)
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEV)
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)]).to(DEV)
    k = torch.randn(len(pos), hkv, head_dim, device=DEV).to(dtype)
    v = torch.randn(len(pos), hkv, head_dim, device=DEV).to(dtype)
    tri.kv_write(k, v, pos, slot_mapping(cache, pos, seq, sink, recent), cache.k_cache, cache.v_cache, cache.pos_cache)
    return cache, sink, recent


@pytest.mark.parametrize("dtype,head_dim,block_size,hkv,group", COMBOS, ids=IDS)
def test_kv_write_matches_reference(dtype, head_dim, block_size, hkv, group):
    lens = [0, 1, block_size, 3000]
    cache, sink, recent = ring_cache([0] * len(lens), dtype, head_dim, block_size, hkv, extra=3000)
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEV)
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)]).to(DEV)
    slots = slot_mapping(cache, pos, seq, sink, recent)
    k = torch.randn(len(pos), hkv, head_dim, device=DEV).to(dtype)
    v = torch.randn(len(pos), hkv, head_dim, device=DEV).to(dtype)
    mine = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.pos_cache)]
    ref.kv_write(k, v, pos, slots, cache.k_cache, cache.v_cache, cache.pos_cache)
    tri.kv_write(k, v, pos, slots, *mine)
    for a, b in zip(mine, (cache.k_cache, cache.v_cache, cache.pos_cache)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("splits", ["planned", "fine", "single"])
@pytest.mark.parametrize("dtype,head_dim,block_size,hkv,group", COMBOS, ids=IDS)
def test_paged_decode_matches_reference(dtype, head_dim, block_size, hkv, group, splits, monkeypatch):
    """One 9000-token sequence among short and empty ones; window heads wrapped."""
    if splits == "fine":  # one tile per split: hundreds of partial states per head
        monkeypatch.setattr(triton_decode, "MIN_SPLIT_TOKENS", triton_decode.TILE_TOKENS)
        monkeypatch.setattr(triton_decode, "PROGRAMS_PER_SM", 1 << 20)
    elif splits == "single":  # no reduce launch
        monkeypatch.setattr(triton_decode, "MIN_SPLIT_TOKENS", 1 << 30)
    lens = [0, 1, block_size, 333, 9000, 700]
    cache, sink, recent = ring_cache(lens, dtype, head_dim, block_size, hkv)
    q = torch.randn(len(lens), hkv * group, head_dim, device=DEV).to(dtype)
    args = decode_args(
        cache, q, torch.tensor([max(n - 1, 0) for n in lens], device=DEV), sink.to(DEV), recent.to(DEV), SCALE
    )
    out, lse = tri.paged_decode(*args)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert_state_close((out, lse), ref.paged_decode(*args), dtype)


@pytest.mark.parametrize("chunk", [1, 64, 128])
@pytest.mark.parametrize("dtype,head_dim,block_size,hkv,group", COMBOS[:2], ids=IDS[:2])
def test_paged_prefix_matches_reference(dtype, head_dim, block_size, hkv, group, chunk):
    # the reference gathers [tokens, kv_heads, cached, D] in fp32: sizes kept to a few GB
    lens = [0, 40, 500, 1000]
    cache, sink, recent = ring_cache(lens, dtype, head_dim, block_size, hkv)
    q_pos = torch.cat([torch.arange(n, n + chunk) for n in lens]).to(DEV)
    q_seq = torch.arange(len(lens)).repeat_interleave(chunk).to(DEV)
    q = torch.randn(len(q_pos), hkv * group, head_dim, device=DEV).to(dtype)
    args = (
        q,
        q_pos,
        q_seq,
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
        cache.block_tables,
        rows_of(cache),
        cache.lengths,
        keep_of(cache, sink.to(DEV)),
        recent.to(DEV),
        SCALE,
    )
    assert_state_close(tri.paged_prefix(*args), ref.paged_prefix(*args), dtype)


@pytest.mark.parametrize("first_pos", [0, 1000])
@pytest.mark.parametrize("dtype,head_dim,block_size,hkv,group", COMBOS, ids=IDS)
def test_sink_window_prefill_matches_reference(dtype, head_dim, block_size, hkv, group, first_pos):
    lens = [0, 1, 300, 2048]
    sink, recent = budgets(len(lens), hkv)
    cu = torch.tensor([sum(lens[:s]) for s in range(len(lens) + 1)], dtype=torch.int32, device=DEV)
    pos = torch.cat([torch.arange(first_pos, first_pos + n) for n in lens]).to(DEV)
    q = torch.randn(len(pos), hkv * group, head_dim, device=DEV).to(dtype)
    k = torch.randn(len(pos), hkv, head_dim, device=DEV).to(dtype)
    v = torch.randn(len(pos), hkv, head_dim, device=DEV).to(dtype)
    args = (q, k, v, pos, cu, sink, recent, SCALE)
    assert_state_close(tri.sink_window_prefill(*args), ref.sink_window_prefill(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_states_matches_reference(dtype):
    o1, o2 = (torch.randn(1000, 32, 128, device=DEV).to(dtype) for _ in range(2))
    lse1, lse2 = (torch.randn(1000, 32, device=DEV) * 4 for _ in range(2))
    lse1[0], lse2[1] = float("-inf"), float("-inf")
    lse1[2], lse2[2] = float("-inf"), float("-inf")
    assert_state_close(tri.merge_states(o1, lse1, o2, lse2), ref.merge_states(o1, lse1, o2, lse2), dtype)


@pytest.mark.parametrize("chunk", [64, 256])
def test_chunked_prefill_pipeline_matches_reference(chunk):
    dtype, d, hkv, group = torch.bfloat16, 128, 8, 4
    lens = [700, 1300]
    sink, recent = budgets(len(lens), hkv)
    rows = sum(lens)
    q = torch.randn(rows, hkv * group, d, device=DEV).to(dtype)
    k = torch.randn(rows, hkv, d, device=DEV).to(dtype)
    v = torch.randn(rows, hkv, d, device=DEV).to(dtype)
    caps = torch.tensor(
        [[head_capacity(int(sink[s, h]), int(recent[s, h]), n) for h in range(hkv)] for s, n in enumerate(lens)]
    )
    caches = [allocate(caps, 16, d, dtype, DEV, torch.Generator().manual_seed(4)) for _ in range(2)]
    states = [
        prefill_in_chunks(ops, c, q, k, v, lens, sink, recent, chunk, SCALE) for ops, c in zip((tri, ref), caches)
    ]
    assert_state_close(states[0], states[1], dtype)


def test_paged_decode_is_cuda_graph_capturable():
    """No host sync in the decode path: it can be captured and replayed."""
    cache, sink, recent = ring_cache([50, 5000], torch.bfloat16, 128, 16, 8)
    q = torch.randn(2, 32, 128, device=DEV, dtype=torch.bfloat16)
    args = decode_args(cache, q, torch.tensor([49, 4999], device=DEV), sink.to(DEV), recent.to(DEV), SCALE)
    expected = tri.paged_decode(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tri.paged_decode(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
