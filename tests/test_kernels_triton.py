"""Triton kernels under TRITON_INTERPRET=1 against their torch references, small shapes.

Tolerances (outputs; lse is fp32 everywhere and gets 1e-4): fp32 atol = rtol = 1e-5
(IEEE dots), fp16 5e-3, bf16 2e-2 (P is rounded to the cache dtype before P@V, as in
flash-attention). Split planning is shrunk so a few dozen tokens span several splits
whose size does not divide the lengths. A last test compiles every kernel for sm_90.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: compiled kernels are covered by tests/gpu/test_kernels_gpu.py", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from headwise.kernels import reference as ref  # noqa: E402
from headwise.kernels import triton_common, triton_decode  # noqa: E402
from headwise.kernels import triton_ops as tri  # noqa: E402
from headwise.kernels.layout import UNBOUNDED  # noqa: E402
from headwise.kernels.triton_cases import (  # noqa: E402
    allocate,
    decode_args,
    head_capacity,
    keep_of,
    position_aligned_cache,
    prefill_in_chunks,
    rows_of,
    slot_mapping,
)

if not triton_common.INTERPRET:
    pytest.skip("triton_ops was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
HKV = 2
SCALE = 0.2
# one combination per row keeps the interpreter time low while covering every axis
COMBOS = [
    # dtype, head_dim, block_size, group
    (torch.float32, 64, 16, 1),
    (torch.bfloat16, 128, 32, 4),
    (torch.float16, 64, 16, 3),
    (torch.bfloat16, 64, 16, 3),
    (torch.float32, 128, 32, 4),
]
COMBO_IDS = [f"{str(c[0])[6:]}-d{c[1]}-bs{c[2]}-g{c[3]}" for c in COMBOS]


def assert_state_close(actual, expected, dtype):
    (o, lse), (o_ref, lse_ref) = actual, expected
    torch.testing.assert_close(o.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4)


def budgets(num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KV head 0 full, head 1 a sink + window whose size varies by sequence."""
    sink = torch.tensor([[0, 2 + s % 2] for s in range(num_seqs)], dtype=torch.int32)
    recent = torch.tensor([[UNBOUNDED, 7 + 3 * (s % 3)] for s in range(num_seqs)], dtype=torch.int32)
    return sink, recent


def ring_cache(lens, dtype, head_dim, block_size, seed=0, extra=0):
    """A cache filled by writing `lens[s]` tokens per sequence through the sink + ring slot mapping."""
    gen = torch.Generator().manual_seed(seed)
    sink, recent = budgets(len(lens))
    caps = torch.tensor(
        [[head_capacity(int(sink[s, h]), int(recent[s, h]), n + extra) for h in range(HKV)] for s, n in enumerate(lens)]
    )
    cache = allocate(caps, block_size, head_dim, dtype, "cpu", gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    k = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    ref.kv_write(k, v, pos, slot_mapping(cache, pos, seq, sink, recent), cache.k_cache, cache.v_cache, cache.pos_cache)
    return cache, sink, recent, gen


def newest(lens) -> torch.Tensor:
    """Position of each sequence's newest token (0 for an empty one)."""
    return torch.tensor([max(n - 1, 0) for n in lens])


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of 32 tokens in tiles of 16: lengths 37 or 53 end in a partial split."""
    monkeypatch.setattr(triton_decode, "TILE_TOKENS", 16)
    monkeypatch.setattr(triton_decode, "MIN_SPLIT_TOKENS", 32)


@pytest.mark.parametrize("dtype,head_dim,block_size,group", COMBOS, ids=COMBO_IDS)
def test_kv_write_matches_reference_with_ring_and_drops(dtype, head_dim, block_size, group):
    lens = [0, 1, block_size, 37]
    cache, sink, recent, gen = ring_cache([0] * len(lens), dtype, head_dim, block_size, extra=40)
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    slots = slot_mapping(cache, pos, seq, sink, recent)
    assert (slots == -1).any(), "the wrapped ring must drop overwritten rows"
    k = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    mine = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.pos_cache)]
    ref.kv_write(k, v, pos, slots, cache.k_cache, cache.v_cache, cache.pos_cache)
    tri.kv_write(k, v, pos, slots, *mine)
    for a, b in zip(mine, (cache.k_cache, cache.v_cache, cache.pos_cache)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,head_dim,block_size,group", COMBOS, ids=COMBO_IDS)
def test_paged_decode_matches_reference_over_ragged_split_heads(dtype, head_dim, block_size, group, small_splits):
    """Per-head lengths 0, 1, one block, wrapped rings and 53 (two partial splits)."""
    lens = [0, 1, block_size, 53]
    cache, sink, recent, gen = ring_cache(lens, dtype, head_dim, block_size)
    assert {0, 1, block_size} <= set(cache.lengths.flatten().tolist())
    q = torch.randn(len(lens), HKV * group, head_dim, generator=gen).to(dtype)
    args = decode_args(cache, q, newest(lens), sink, recent, SCALE)
    table_tokens = cache.block_tables.shape[2] * block_size
    per_split, max_splits = triton_decode.plan_splits(len(lens), HKV, table_tokens, q.device)
    assert max_splits > 1 and 53 % per_split != 0
    out, lse = tri.paged_decode(*args)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert_state_close((out, lse), ref.paged_decode(*args), dtype)


@pytest.mark.parametrize("dtype,head_dim,block_size,group", COMBOS[:3], ids=COMBO_IDS[:3])
def test_paged_decode_masks_expired_slots_of_position_aligned_windows(dtype, head_dim, block_size, group, small_splits):
    """Window heads keep sink blocks + the blocks overlapping their window; a table row of
    a later batch entry (rows permuted) and the expired head of the oldest block masked."""
    newest = [3, 40, 77, 120]
    sink, recent = budgets(len(newest))
    gen = torch.Generator().manual_seed(7)
    cache, _, _ = position_aligned_cache(newest, sink, recent, block_size, head_dim, dtype, "cpu", gen)
    order = torch.tensor([2, 0, 3, 1])
    q = torch.randn(len(newest), HKV * group, head_dim, generator=gen).to(dtype)
    args = (
        q,
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
        cache.block_tables,
        order.int(),
        cache.lengths[order],
        torch.minimum(sink, cache.lengths)[order],
        recent[order],
        torch.tensor(newest)[order],
        SCALE,
    )
    assert_state_close(tri.paged_decode(*args), ref.paged_decode(*args), dtype)


def test_kv_write_and_decode_on_one_pool_holding_k_and_v():
    """docs/design.md's `[num_blocks, 2, block_size, head_dim]` pool: K and V are strided views."""
    gen = torch.Generator().manual_seed(5)
    pool = torch.zeros(8, 2, 16, 64)
    pos_cache = torch.zeros(8, 16, dtype=torch.int32)
    tables = torch.tensor([[[3, 5], [1, 6]]], dtype=torch.int32)
    k, v = torch.randn(2, 20, HKV, 64, generator=gen)
    slots = (tables[0, :, torch.arange(20) // 16] * 16 + torch.arange(20) % 16).T.contiguous()
    tri.kv_write(k, v, torch.arange(20), slots, pool[:, 0], pool[:, 1], pos_cache)
    q = torch.randn(1, HKV * 4, 64, generator=gen)
    lengths = torch.tensor([[20, 20]], dtype=torch.int32)
    mask = (torch.zeros(1), lengths * 0, lengths * 0 + UNBOUNDED, torch.tensor([19]), SCALE)
    out = tri.paged_decode(
        q, pool[:, 0], pool[:, 1], pos_cache, tables, torch.zeros(1, dtype=torch.int32), lengths, *mask[1:]
    )
    dense_k, dense_v = pool[:, 0].clone(), pool[:, 1].clone()
    expected = ref.paged_decode(
        q, dense_k, dense_v, pos_cache, tables, torch.zeros(1, dtype=torch.int32), lengths, *mask[1:]
    )
    assert_state_close(out, expected, torch.float32)
    assert torch.equal(dense_k.view(-1, 64)[slots.long().view(-1)], k.reshape(-1, 64))


def test_paged_decode_single_split_writes_output_directly():
    cache, sink, recent, gen = ring_cache([0, 5, 30], torch.float32, 64, 16)
    q = torch.randn(3, HKV * 4, 64, generator=gen)
    args = decode_args(cache, q, newest([0, 5, 30]), sink, recent, SCALE)
    assert triton_decode.plan_splits(3, HKV, cache.block_tables.shape[2] * 16, q.device)[1] == 1
    assert_state_close(tri.paged_decode(*args), ref.paged_decode(*args), torch.float32)


@pytest.mark.parametrize("chunk", [1, 7, 20])
@pytest.mark.parametrize("dtype,head_dim,block_size,group", COMBOS[:3], ids=COMBO_IDS[:3])
def test_paged_prefix_matches_reference_on_wrapped_rings(dtype, head_dim, block_size, group, chunk):
    """Chunks after histories 0, 5, one block and 40 tokens; tokens of the sequences interleaved."""
    lens = [0, 5, block_size, 40]
    cache, sink, recent, gen = ring_cache(lens, dtype, head_dim, block_size)
    q_pos = torch.cat([torch.arange(n, n + chunk) for n in lens])
    q_seq = torch.arange(len(lens)).repeat_interleave(chunk)
    order = torch.randperm(len(q_pos), generator=gen)
    q_pos, q_seq = q_pos[order], q_seq[order]
    q = torch.randn(len(q_pos), HKV * group, head_dim, generator=gen).to(dtype)
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
        keep_of(cache, sink),
        recent,
        SCALE,
    )
    out, lse = tri.paged_prefix(*args)
    assert torch.all(lse[q_seq == 0] == float("-inf"))
    assert_state_close((out, lse), ref.paged_prefix(*args), dtype)


@pytest.mark.parametrize("first_pos", [0, 9])
@pytest.mark.parametrize("dtype,head_dim,block_size,group", COMBOS, ids=COMBO_IDS)
def test_sink_window_prefill_matches_reference(dtype, head_dim, block_size, group, first_pos):
    """Sequences of 0, 1, 0, 16 and 150 tokens: the long one skips tiles outside sink + window."""
    lens = [0, 1, 0, 16, 150]
    gen = torch.Generator().manual_seed(1)
    sink, recent = budgets(len(lens))
    recent[1, 1] = 1  # only the diagonal (and sinks) visible
    sink[4, 1] = 0
    cu = torch.tensor([sum(lens[:s]) for s in range(len(lens) + 1)], dtype=torch.int32)
    pos = torch.cat([torch.arange(first_pos, first_pos + n) for n in lens])
    q = torch.randn(len(pos), HKV * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    args = (q, k, v, pos, cu, sink, recent, SCALE)
    assert_state_close(tri.sink_window_prefill(*args), ref.sink_window_prefill(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_states_matches_reference_including_empty_states(dtype):
    gen = torch.Generator().manual_seed(2)
    o1, o2 = (torch.randn(5, 3, 64, generator=gen).to(dtype) for _ in range(2))
    lse1, lse2 = (torch.randn(5, 3, generator=gen) * 4 for _ in range(2))
    lse1[0], lse2[1] = float("-inf"), float("-inf")
    lse1[2, 0] = lse2[2, 0] = float("-inf")
    out, lse = tri.merge_states(o1, lse1, o2, lse2)
    assert torch.all(out[2, 0] == 0) and lse[2, 0] == float("-inf")
    assert_state_close((out, lse), ref.merge_states(o1, lse1, o2, lse2), dtype)


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 6), (torch.bfloat16, 16)])
def test_chunked_prefill_then_decode_matches_reference_pipeline(dtype, chunk, small_splits):
    """The engine's sequence of ops, all Triton, against the same sequence of references."""
    lens, steps, d, group = [3, 29, 45], 2, 64, 3
    sink, recent = budgets(len(lens))
    gen = torch.Generator().manual_seed(3)
    rows = sum(lens)
    q = torch.randn(rows, HKV * group, d, generator=gen).to(dtype)
    k = torch.randn(rows, HKV, d, generator=gen).to(dtype)
    v = torch.randn(rows, HKV, d, generator=gen).to(dtype)
    caps = torch.tensor(
        [[head_capacity(int(sink[s, h]), int(recent[s, h]), n + steps) for h in range(HKV)] for s, n in enumerate(lens)]
    )
    caches = [allocate(caps, 16, d, dtype, "cpu", torch.Generator().manual_seed(4)) for _ in range(2)]
    states = [
        prefill_in_chunks(ops, c, q, k, v, lens, sink, recent, chunk, SCALE) for ops, c in zip((tri, ref), caches)
    ]
    assert_state_close(states[0], states[1], dtype)
    seqs = torch.arange(len(lens))
    for step in range(steps):
        pos = torch.tensor(lens) + step
        qd = torch.randn(len(lens), HKV * group, d, generator=gen).to(dtype)
        kd = torch.randn(len(lens), HKV, d, generator=gen).to(dtype)
        results = []
        for ops, c in zip((tri, ref), caches):
            ops.kv_write(kd, kd, pos, slot_mapping(c, pos, seqs, sink, recent), c.k_cache, c.v_cache, c.pos_cache)
            results.append(ops.paged_decode(*decode_args(c, qd, pos, sink, recent, SCALE)))
        assert_state_close(results[0], results[1], dtype)


def test_triton_ops_has_the_signatures_of_the_reference():
    for name in tri.__all__:
        assert (
            inspect.signature(getattr(tri, name)).parameters.keys()
            == inspect.signature(getattr(ref, name)).parameters.keys()
        ), name


def test_dispatcher_forced_to_triton_runs_the_kernels():
    from headwise.kernels import ops

    cache, sink, recent, gen = ring_cache([0, 20], torch.float32, 64, 16)
    q = torch.randn(2, HKV * 3, 64, generator=gen)
    args = decode_args(cache, q, newest([0, 20]), sink, recent, SCALE)
    assert ops.backend_for(q) is ref
    previous = ops.force_backend("triton")
    try:
        assert ops.backend_for(q) is tri
        assert_state_close(ops.paged_decode(*args), ref.paged_decode(*args), torch.float32)
    finally:
        ops.force_backend(previous)
    with pytest.raises(ValueError, match="HEADWISE_KERNELS='cuda'"):
        ops.force_backend("cuda")


def test_bad_inputs_raise_value_error_naming_the_argument():
    cache, sink, recent, _ = ring_cache([4], torch.float32, 64, 16)
    q = torch.randn(1, 6, 64)
    good = decode_args(cache, q, newest([4]), sink, recent, SCALE)
    with pytest.raises(ValueError, match="multiple of 4 KV heads"):
        tri.paged_decode(*good[:4], torch.zeros(1, 4, 2, dtype=torch.int32), *good[5:])
    with pytest.raises(ValueError, match="k_cache.dtype"):
        tri.paged_decode(q.half(), *good[1:])
    with pytest.raises(ValueError, match="lengths shape"):
        tri.paged_decode(*good[:6], cache.lengths[:, :1], *good[7:])
    with pytest.raises(ValueError, match="head_dim"):
        tri.paged_decode(torch.randn(1, 6, 32), *good[1:])
    with pytest.raises(ValueError, match="slot_mapping"):
        tri.kv_write(
            torch.randn(2, 2, 64),
            torch.randn(2, 2, 64),
            torch.arange(2),
            torch.zeros(2, 3),
            cache.k_cache,
            cache.v_cache,
            cache.pos_cache,
        )


# RMSNorm / RoPE: the interpreter rounds fp32 -> bf16 towards zero (a GPU rounds to nearest,
# as torch does), so bf16 results may differ by one bf16 ulp (2^-7 relative) per rounding;
# fp16 and fp32 rounding match torch's
NORM_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 1024])
def test_rms_norm_and_residual_add_match_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 2 * hidden, generator=gen) * 3).to(dtype)[:, :hidden]  # strided rows
    residual = torch.randn(5, hidden, generator=gen).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    tol = NORM_TOL[dtype]
    torch.testing.assert_close(tri.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5), atol=tol, rtol=tol)
    y, s = tri.add_rms_norm(x, residual, weight, 1e-5)
    y_ref, s_ref = ref.add_rms_norm(x, residual, weight, 1e-5)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(s, s_ref, atol=0, rtol=2**-7)
    else:
        assert torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,hq,hkv", [(64, 9, 3), (128, 8, 2)])
def test_rotary_of_fused_qkv_views_matches_reference(dtype, head_dim, hq, hkv):
    """q and k are strided views of one qkv projection, as in the model; fp32 / fp16 bit-identical."""
    gen = torch.Generator().manual_seed(7)
    t = 6
    qkv = torch.randn(t, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(t, hkv, head_dim)
    angles = torch.arange(t, dtype=torch.float32)[:, None] * torch.rand(head_dim // 2, generator=gen)[None, :]
    table = torch.cat([angles.cos(), angles.sin()], dim=-1)  # the model's cos | sin layout
    cos, sin = table[:, : head_dim // 2], table[:, head_dim // 2 :]
    (qo, ko), (q_ref, k_ref) = tri.apply_rotary(q, k, cos, sin), ref.apply_rotary(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(qo, q_ref, atol=1e-6, rtol=2**-7)
        torch.testing.assert_close(ko, k_ref, atol=1e-6, rtol=2**-7)
    else:
        assert torch.equal(qo, q_ref) and torch.equal(ko, k_ref)
    assert torch.equal(q, qkv[:, : hq * head_dim].view(t, hq, head_dim)), "the inputs are not overwritten"


def test_norm_and_rotary_bad_inputs_name_the_argument():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="weight shape"):
        tri.rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(ValueError, match="residual.dtype"):
        tri.add_rms_norm(x, x.half(), torch.ones(64), 1e-5)
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="cos.dtype"):
        tri.apply_rotary(q, k, torch.ones(3, 32, dtype=torch.float64), torch.ones(3, 32))
    with pytest.raises(ValueError, match="sin shape"):
        tri.apply_rotary(q, k, torch.ones(3, 32), torch.ones(3, 64))


def test_every_kernel_compiles_for_sm90():
    """The interpreter accepts code the GPU compiler rejects; compile it for an H100 without one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-W", "ignore", "-m", "headwise.kernels.triton_compile_check", "--arch", "90"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 30 kernel variants for sm_90" in proc.stdout
