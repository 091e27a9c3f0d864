"""FP8 KV cache ops: the torch references' round trip, and the Triton kernels (TRITON_INTERPRET=1)
against the references on the same fp8 pool.

Bounds. One element round trip: e4m3 keeps 3 mantissa bits, so |x - deq(q(x))| <= 2^-4 |x|
for normal values plus half the smallest subnormal step (2^-10 scale); e5m2 keeps 2 bits:
2^-3 |x| + 2^-17 scale. Attention over an fp8 cache vs the same attention over the exact
K/V: an output is a convex combination of V rows, so V's rounding moves it by at most the
element bound of the head's largest |v|; K's rounding moves the weights by about as much
(scores of unit-variance data at scale 0.2): outputs within 2 x that bound per head.
Triton vs reference on the same fp8 bytes: the tolerances of the query dtype
(tests/test_kernels_triton.py) since both widen the same bytes.
"""

from __future__ import annotations

import os

import pytest
import torch

from headwise.kernels import reference as ref
from headwise.kernels.kv_quant import KVCacheDtypeError, cache_dtype, dequantize, fp8_max, quantize
from headwise.kernels.layout import UNBOUNDED
from headwise.kernels.triton_cases import allocate, decode_args, head_capacity, keep_of, rows_of, slot_mapping

HKV = 2
SCALE = 0.2
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
REL = {torch.float8_e4m3fn: 2**-4, torch.float8_e5m2: 2**-3}
ABS = {torch.float8_e4m3fn: 2**-10, torch.float8_e5m2: 2**-17}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def test_kv_cache_dtype_names_are_vllms():
    assert cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert cache_dtype("fp8", torch.float32) is torch.float8_e4m3fn
    assert cache_dtype("fp8_e4m3", torch.float32) is torch.float8_e4m3fn
    assert cache_dtype("fp8_e5m2", torch.float32) is torch.float8_e5m2
    with pytest.raises(KVCacheDtypeError, match="'int8'"):
        cache_dtype("int8", torch.float32)


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_quantize_round_trip_within_the_format_bound_and_saturates_beyond_the_scale(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, HKV, 64, generator=gen) * torch.tensor([3.0, 0.01])[:, None]
    scale = x.abs().amax(dim=(0, 2)) / fp8_max(dtype)
    back = dequantize(quantize(x, scale, dtype), scale, 1)
    bound = REL[dtype] * x.abs() + ABS[dtype] * scale[:, None]
    assert (back - x).abs().le(bound).all()
    huge = torch.full((1, HKV, 64), 10.0) * scale[:, None] * fp8_max(dtype)
    assert torch.equal(
        dequantize(quantize(huge, scale, dtype), scale, 1), (scale * fp8_max(dtype))[:, None].expand(1, HKV, 64)
    )


def _fp8_cache(lens, cache_dtype_, dtype, head_dim, block_size, seed=0):
    """The same K/V written through the sink + ring slot mapping into an exact (dtype) and
    an fp8 pool with per-head scales; returns (exact, fp8, k_scale, v_scale, sink, recent, gen)."""
    gen = torch.Generator().manual_seed(seed)
    sink = torch.tensor([[0, 2 + s % 2] for s in range(len(lens))], dtype=torch.int32)
    recent = torch.tensor([[UNBOUNDED, 7 + 3 * (s % 3)] for s in range(len(lens))], dtype=torch.int32)
    caps = torch.tensor(
        [[head_capacity(int(sink[s, h]), int(recent[s, h]), n) for h in range(HKV)] for s, n in enumerate(lens)]
    )
    exact = allocate(caps, block_size, head_dim, dtype, "cpu", torch.Generator().manual_seed(1))
    quant = allocate(caps, block_size, head_dim, dtype, "cpu", torch.Generator().manual_seed(1))
    quant.k_cache, quant.v_cache = (torch.zeros(quant.k_cache.shape, dtype=cache_dtype_) for _ in range(2))
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    # head 1 an order of magnitude smaller: the per-head scale is what keeps its precision
    k = (torch.randn(len(pos), HKV, head_dim, generator=gen) * torch.tensor([1.0, 0.1])[:, None]).to(dtype)
    v = (torch.randn(len(pos), HKV, head_dim, generator=gen) * torch.tensor([1.0, 0.1])[:, None]).to(dtype)
    top = fp8_max(cache_dtype_)
    k_scale = k.float().abs().amax(dim=(0, 2)) / top
    v_scale = v.float().abs().amax(dim=(0, 2)) / top
    for c in (exact, quant):
        slots = slot_mapping(c, pos, seq, sink, recent)
        ref.kv_write(k, v, pos, slots, c.k_cache, c.v_cache, c.pos_cache, *((k_scale, v_scale) if c is quant else ()))
    return exact, quant, k_scale, v_scale, sink, recent, gen


@pytest.mark.parametrize("cdt", FP8, ids=["e4m3", "e5m2"])
def test_reference_decode_and_prefix_over_fp8_stay_within_the_bound_of_exact_kv(cdt):
    lens = [1, 16, 53]
    exact, quant, ks, vs, sink, recent, gen = _fp8_cache(lens, cdt, torch.float32, 64, 16)
    bound = 2 * REL[cdt] * vs * fp8_max(cdt)  # vs x max = the head's largest |v|
    q = torch.randn(len(lens), HKV * 3, 64, generator=gen)
    q_pos = torch.tensor([n - 1 for n in lens])
    o_exact, _ = ref.paged_decode(*decode_args(exact, q, q_pos, sink, recent, SCALE))
    o_fp8, _ = ref.paged_decode(*decode_args(quant, q, q_pos, sink, recent, SCALE), ks, vs)
    err = (o_fp8 - o_exact).abs().view(len(lens), HKV, 3, 64).amax(dim=(0, 2, 3))
    assert (err <= bound).all() and (err > 0).all(), (err, bound)
    chunk_pos = torch.cat([torch.arange(n, n + 4) for n in lens])
    chunk_seq = torch.arange(len(lens)).repeat_interleave(4)
    qc = torch.randn(len(chunk_pos), HKV * 3, 64, generator=gen)

    def prefix(c, *scales):
        args = (qc, chunk_pos, chunk_seq, c.k_cache, c.v_cache, c.pos_cache, c.block_tables, rows_of(c))
        return ref.paged_prefix(*args, c.lengths, keep_of(c, sink), recent, SCALE, *scales)[0]

    err = (prefix(quant, ks, vs) - prefix(exact)).abs().view(-1, HKV, 3, 64).amax(dim=(0, 2, 3))
    assert (err <= bound).all() and (err > 0).all(), (err, bound)


def _triton():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: tests/gpu/test_kernels_gpu.py runs the compiled kernels")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed")
    from headwise.kernels import triton_common
    from headwise.kernels import triton_ops as tri

    if not triton_common.INTERPRET:
        pytest.skip("triton_ops was imported before TRITON_INTERPRET=1 was set")
    return tri


CASES = [(torch.float32, torch.float8_e4m3fn, 64, 16, 3), (torch.bfloat16, torch.float8_e5m2, 128, 32, 4)]
IDS = ["f32-e4m3-d64-bs16-g3", "bf16-e5m2-d128-bs32-g4"]


@pytest.mark.parametrize("dtype,cdt,head_dim,block_size,group", CASES, ids=IDS)
def test_triton_kv_write_stores_the_bytes_the_reference_stores(dtype, cdt, head_dim, block_size, group):
    tri = _triton()
    lens = [1, block_size, 37]
    _, quant, ks, vs, sink, recent, gen = _fp8_cache(lens, cdt, dtype, head_dim, block_size)
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])
    quant.lengths.zero_()
    slots = slot_mapping(quant, pos, seq, sink, recent)
    k = (torch.randn(len(pos), HKV, head_dim, generator=gen) * 3).to(dtype)  # some beyond the scale: saturated
    v = torch.randn(len(pos), HKV, head_dim, generator=gen).to(dtype)
    mine = [t.clone() for t in (quant.k_cache, quant.v_cache, quant.pos_cache)]
    ref.kv_write(k, v, pos, slots, quant.k_cache, quant.v_cache, quant.pos_cache, ks, vs)
    tri.kv_write(k, v, pos, slots, *mine, ks, vs)
    assert torch.equal(mine[2], quant.pos_cache)
    for a, b in zip(mine[:2], (quant.k_cache, quant.v_cache)):
        da, db = a.float(), b.float()
        # the interpreter's fp32 -> fp8 cast does not round like torch: a value may land one
        # fp8 step away, and it loses the exponent carry when the mantissa rounds up to the
        # next power of two (giving half of it); a GPU rounds like torch (tests/gpu)
        carry = (da * 2 == db) & (torch.frexp(db)[0].abs() == 0.5)
        step = 2 * REL[cdt] * torch.maximum(da.abs(), db.abs()) + 2 * ABS[cdt]
        assert ((da - db).abs() <= step)[~carry].all()
        assert (da == db).float().mean() > 0.95 and carry.float().mean() < 0.05
        assert da.abs().max() <= fp8_max(cdt)


@pytest.mark.parametrize("dtype,cdt,head_dim,block_size,group", CASES, ids=IDS)
def test_triton_decode_and_prefix_read_fp8_like_the_reference(dtype, cdt, head_dim, block_size, group, monkeypatch):
    tri = _triton()
    from headwise.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "TILE_TOKENS", 16)
    monkeypatch.setattr(triton_decode, "MIN_SPLIT_TOKENS", 32)  # several splits: the V scale per split
    lens = [0, 5, block_size, 53]
    _, quant, ks, vs, sink, recent, gen = _fp8_cache(lens, cdt, dtype, head_dim, block_size)
    q = torch.randn(len(lens), HKV * group, head_dim, generator=gen).to(dtype)
    args = decode_args(quant, q, torch.tensor([max(n - 1, 0) for n in lens]), sink, recent, SCALE)
    (o, lse), (o_ref, lse_ref) = tri.paged_decode(*args, ks, vs), ref.paged_decode(*args, ks, vs)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4)
    chunk = 7
    q_pos = torch.cat([torch.arange(n, n + chunk) for n in lens])
    q_seq = torch.arange(len(lens)).repeat_interleave(chunk)
    qc = torch.randn(len(q_pos), HKV * group, head_dim, generator=gen).to(dtype)
    pargs = (qc, q_pos, q_seq, quant.k_cache, quant.v_cache, quant.pos_cache, quant.block_tables, rows_of(quant))
    pargs += (quant.lengths, keep_of(quant, sink), recent, SCALE, ks, vs)
    (o, lse), (o_ref, lse_ref) = tri.paged_prefix(*pargs), ref.paged_prefix(*pargs)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4)


def test_triton_fp8_ops_refuse_a_missing_scale():
    tri = _triton()
    from headwise.kernels import debug

    if not debug.CHECKS:
        pytest.skip("input checks run with HEADWISE_DEBUG=1")
    _, quant, ks, vs, sink, recent, gen = _fp8_cache([4], torch.float8_e4m3fn, torch.float32, 64, 16)
    q = torch.randn(1, HKV * 3, 64, generator=gen)
    with pytest.raises(ValueError, match="k_scale is required"):
        tri.paged_decode(*decode_args(quant, q, torch.tensor([3]), sink, recent, SCALE))
