"""The CPU's C++ ops (kernels/cpu_ops.py): paged decode computes what the gathering reference
does, for the head sizes it specialises and any other, with windows that have moved (sinks,
per-slot positions, released blocks) or not, and the reference hands it only the cases it
serves (fp32 caches, no fp8 scales); add + RMSNorm and RoPE compute
the torch formulas and serve fp32 CPU tensors only."""

from __future__ import annotations

import os

import pytest
import torch

from headwise.kernels import cpu_ops
from headwise.kernels import reference as ref

pytestmark = pytest.mark.skipif(
    os.environ.get("HEADWISE_CPU_DECODE", "").lower() == "torch", reason="the op is switched off"
)
BS = 16


def test_the_op_builds_on_this_machine():
    assert cpu_ops.available()


def _workload(d: int, dtype: torch.dtype, seed: int, bs: int = BS):
    """5 sequences x 2 KV heads x 3 query heads each over a shuffled pool: lengths 0, 1, a
    partial block, whole blocks, and a long one; table rows in a different order than the batch."""
    g = torch.Generator().manual_seed(seed)
    b, hkv, hq, width = 5, 2, 6, 192 // bs
    pool = 2 * b * hkv * width
    k_cache = torch.randn(pool, bs, d, generator=g).to(dtype)
    v_cache = torch.randn(pool, bs, d, generator=g).to(dtype)
    tables = torch.randperm(pool, generator=g)[: (b + 1) * hkv * width].view(b + 1, hkv, width).int()
    lengths = torch.tensor([[0, 1], [7, 16], [32, 33], [190, 2], [100, 150]], dtype=torch.int32)
    rows = torch.tensor([5, 0, 3, 1, 2], dtype=torch.int32)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, rows, lengths


def _gathering_reference(q, k_cache, v_cache, tables, rows, lengths, scale, monkeypatch):
    b, hkv = lengths.shape
    pos = torch.zeros(k_cache.shape[:2], dtype=torch.int32)
    keep = torch.zeros(b, hkv, dtype=torch.int32)
    recent = torch.full((b, hkv), 1 << 30, dtype=torch.int32)
    q_pos = lengths.amax(1) - 1
    with monkeypatch.context() as m:
        m.setattr(cpu_ops, "serves", lambda *a: False)
        return ref.paged_decode(q, k_cache, v_cache, pos, tables, rows, lengths, keep, recent, q_pos, scale)


# 16-slot blocks and their multiples score 16 slots per reduction; 8-slot blocks, and head sizes
# that are no multiple of 16, one slot at a time
@pytest.mark.parametrize(("d", "bs"), [(64, 16), (128, 16), (48, 16), (64, 32), (64, 8)])
def test_op_equals_the_gathering_reference(d, bs, monkeypatch):
    args = _workload(d, torch.float32, seed=d + bs, bs=bs)
    want_out, want_lse = _gathering_reference(*args, 0.125, monkeypatch)
    out, lse = cpu_ops.paged_decode(*args, 0.125)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    # a head with no slot: output 0, lse -inf (the reference's convention)
    assert torch.all(out[0, :3] == 0) and torch.all(lse[0, :3] == float("-inf"))


def _moved_windows(tables, lengths, blocks: int, bs: int, seed: int):
    """Per-slot positions, sinks and windows for the workload's heads, as a window head's
    cache has them after its window moved: shuffled positions below the query's, a random
    sink count (`keep`), a random window, and some blocks released (-1) in the table."""
    g = torch.Generator().manual_seed(seed)
    b, hkv = lengths.shape
    q_pos = lengths.amax(1).long() + 40
    pos = torch.randint(0, int(q_pos.max()) + 1, (blocks, bs), generator=g, dtype=torch.int32)
    keep = (torch.rand(b, hkv, generator=g) * lengths.float() * 0.5).int()
    recent = torch.randint(1, 120, (b, hkv), generator=g, dtype=torch.int32)
    recent[3, 1] = 1  # a head that sees nothing: no sink, its only slot older than the window
    pos[tables[3, 1, 0]] = 0
    keep[3, 1] = 0
    tables = tables.clone()
    released = torch.rand(tables.shape, generator=g) < 0.3
    tables[released] = -1
    return tables, pos, keep, recent, q_pos


@pytest.mark.parametrize(("d", "bs"), [(64, 16), (128, 16), (48, 16), (64, 8)])
def test_op_equals_the_gathering_reference_with_moved_windows(d, bs, monkeypatch):
    q, k_cache, v_cache, tables, rows, lengths = _workload(d, torch.float32, seed=3 * d + bs, bs=bs)
    tables, pos, keep, recent, q_pos = _moved_windows(tables, lengths, k_cache.shape[0], bs, seed=d + bs)
    args = (q, k_cache, v_cache, pos, tables, rows, lengths, keep, recent, q_pos, 0.125)
    with monkeypatch.context() as m:
        m.setattr(cpu_ops, "serves", lambda *a: False)
        want_out, want_lse = ref.paged_decode(*args)
    reach = q_pos[:, None] - recent.long()
    out, lse = cpu_ops.paged_decode(q, k_cache, v_cache, tables, rows, lengths, 0.125, pos, keep, reach)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    assert torch.all(out[3, 3:] == 0) and torch.all(lse[3, 3:] == float("-inf"))
    assert torch.isfinite(lse[4]).all()  # the mask left something: the test is not all -inf
    got_out, got_lse = ref.paged_decode(*args)  # the reference hands it to the op
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse)


def test_reference_hands_the_op_only_unscaled_fp32_decodes(monkeypatch):
    q, k_cache, v_cache, tables, rows, lengths = _workload(64, torch.float32, seed=1)
    b, hkv = lengths.shape
    pos = torch.zeros(k_cache.shape[:2], dtype=torch.int32)
    keep = torch.zeros(b, hkv, dtype=torch.int32)
    q_pos = lengths.amax(1) - 1
    calls = []
    real = cpu_ops.paged_decode
    monkeypatch.setattr(cpu_ops, "paged_decode", lambda *a: calls.append(1) or real(*a))
    unbounded = torch.full((b, hkv), 1 << 30, dtype=torch.int32)
    ref.paged_decode(q, k_cache, v_cache, pos, tables, rows, lengths, keep, unbounded, q_pos, 0.125)
    assert calls == [1]
    bf16 = [t.bfloat16() for t in (q, k_cache, v_cache)]
    ref.paged_decode(*bf16, pos, tables, rows, lengths, keep, unbounded, q_pos, 0.125)
    window = torch.full((b, hkv), 8, dtype=torch.int32)  # positions up to 189: windows of 8 have moved
    ref.paged_decode(q, k_cache, v_cache, pos, tables, rows, lengths, keep, window, q_pos, 0.125)
    assert calls == [1, 1]
    scale = torch.ones(hkv)
    ref.paged_decode(q, k_cache, v_cache, pos, tables, rows, lengths, keep, unbounded, q_pos, 0.125, scale, scale)
    assert calls == [1, 1]


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_add_rms_norm_op_equals_the_torch_formula(rows):
    g = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g)
    weight = torch.randn(576, generator=g)
    out, total = cpu_ops.add_rms_norm(x, residual, weight, 1e-5)
    s = x.double() + residual.double()
    want = weight.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(total, x + residual)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=2e-6)


def test_rotate_half_op_equals_the_rotation_of_a_strided_view():
    """q comes out of the fused qkv product as a strided view: the op rotates it as the
    reference does (pair j is (x[j], x[j + D/2])), bit for bit."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 9 * 64 + 2 * 3 * 64, generator=g)
    q = qkv[:, : 9 * 64].view(5, 9, 64)
    cos, sin = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    x1, x2 = q.double().chunk(2, dim=-1)
    c, s = cos.double()[:, None], sin.double()[:, None]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    got = cpu_ops.rotate_half(q, cos, sin)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    # products rounded one by one (no FMA contraction): the eager torch formula's bits
    from headwise.kernels.reference_layer import _rotate_half

    assert torch.equal(got, _rotate_half(q, cos[:, None], sin[:, None]))


@pytest.mark.parametrize("d", [64, 128])
def test_causal_prefill_op_equals_sdpa(d, monkeypatch):
    """Sequences of 1, 15-17 (query-block edges), 64-65 (key-block edges) and 203 tokens in one
    flat batch, q / k / v strided views of one fused qkv product, 3 query heads per KV head."""
    from headwise.kernels import reference_cpu

    g = torch.Generator().manual_seed(d)
    lens = [1, 15, 16, 17, 64, 65, 203]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t, hq, hkv = int(cu[-1]), 6, 2
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g) * 2
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    got = cpu_ops.causal_prefill(q, k, v, cu, 0.125)
    with monkeypatch.context() as m:
        m.setattr(cpu_ops, "serves", lambda *a: False)
        want = reference_cpu.causal_prefill(q, k, v, cu, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    calls = []
    real = cpu_ops.causal_prefill
    monkeypatch.setattr(cpu_ops, "causal_prefill", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(reference_cpu.causal_prefill(q, k, v, cu, 0.125), got, atol=0, rtol=0)
    reference_cpu.causal_prefill(q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(), cu, 0.1)
    assert calls == [1]  # head_dim 48 stays on SDPA


@pytest.mark.parametrize("d", [64, 128])
def test_windowed_prefill_op_equals_the_sink_window_reference(d, monkeypatch):
    """Per-head (sink, recent) masks over the same ragged batch: windows of 1 (a query sees
    only itself), shorter than a key block, a block and a bit, wider than every sequence;
    sinks of 0, inside the first key block and past it. The op skips key blocks no query of a
    tile sees; it equals `reference.sink_window_prefill` and the torch fallback."""
    from headwise.kernels import reference_cpu

    g = torch.Generator().manual_seed(d + 1)
    lens = [1, 17, 65, 203, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t, hq, hkv = int(cu[-1]), 8, 4
    q, k, v = (torch.randn(t, h, d, generator=g) * 2 for h in (hq, hkv, hkv))
    sink = torch.tensor([[0, 4, 0, 70], [4, 0, 1, 0], [0, 70, 4, 4], [4, 0, 70, 0], [0, 4, 130, 1]], dtype=torch.int32)
    recent = torch.tensor(
        [[1, 9, 1 << 40, 70], [1, 16, 65, 1 << 40], [9, 1, 70, 33], [70, 9, 16, 1], [33, 64, 1, 100]], dtype=torch.int64
    )
    positions = torch.cat([torch.arange(n) for n in lens])
    want, _ = ref.sink_window_prefill(q, k, v, positions, cu, sink, recent.clamp(max=1 << 30), 0.125)
    got = cpu_ops.causal_prefill(q, k, v, cu, 0.125, sink, recent)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    with monkeypatch.context() as m:
        m.setattr(cpu_ops, "serves", lambda *a: False)
        slow = reference_cpu.causal_prefill(q, k, v, cu, 0.125, sink, recent)
    torch.testing.assert_close(slow, want, atol=2e-5, rtol=2e-5)
    full = torch.full_like(recent, 1 << 40)
    torch.testing.assert_close(
        cpu_ops.causal_prefill(q, k, v, cu, 0.125, sink, full), cpu_ops.causal_prefill(q, k, v, cu, 0.125)
    )
    with pytest.raises(RuntimeError, match="recent >= 1"):
        cpu_ops.causal_prefill(q, k, v, cu, 0.125, sink, recent * 0)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_silu_and_mul_op_equals_the_torch_formula(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * 200, generator=g) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])  # exp's clamps and silu's zero
    gate, up = x.double().chunk(2, dim=-1)
    want = gate * torch.sigmoid(gate) * up
    got = cpu_ops.silu_and_mul(x)
    assert got.shape == (rows, 200)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_layer_references_keep_autograd_where_a_gradient_is_wanted(monkeypatch):
    """The ops have no backward: with inputs that require grad, the references run the torch
    formulas, whose gradients reach every input (duo's profiler trains through them)."""
    from headwise.kernels import reference_layer

    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    w = torch.randn(64, generator=g)
    q, k = torch.randn(4, 2, 64, generator=g), torch.randn(4, 1, 64, generator=g)
    cos, sin = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    h = torch.randn(4, 2 * 48, generator=g)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (x, r, q, k, h)]
        a, s = reference_layer.add_rms_norm(leaves[0], leaves[1], w, 1e-6)
        qr, kr = reference_layer.apply_rotary(leaves[2], leaves[3], cos, sin)
        act = reference_layer.silu_and_mul(leaves[4])
        (a.square().sum() + s.sum() + qr.square().sum() + kr.square().sum() + act.square().sum()).backward()
        return [t.grad for t in leaves]

    got = grads()
    monkeypatch.setattr(cpu_ops, "serves", lambda *a: False)
    for g_op, g_torch in zip(got, grads()):
        assert g_op is not None
        torch.testing.assert_close(g_op, g_torch, atol=0, rtol=0)


def test_layer_references_hand_fp32_cpu_tensors_to_the_ops(monkeypatch):
    from headwise.kernels import reference_layer

    calls = []
    for name in ("add_rms_norm", "rotate_half", "silu_and_mul"):
        real = getattr(cpu_ops, name)
        monkeypatch.setattr(cpu_ops, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x = torch.randn(3, 64)
    reference_layer.add_rms_norm(x, x, torch.ones(64), 1e-6)
    q, k, cos = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 32)
    reference_layer.apply_rotary(q, k, cos, cos)
    reference_layer.silu_and_mul(x)
    assert calls == ["add_rms_norm", "rotate_half", "rotate_half", "silu_and_mul"]
    reference_layer.add_rms_norm(x.bfloat16(), x.bfloat16(), torch.ones(64).bfloat16(), 1e-6)
    reference_layer.apply_rotary(q.bfloat16(), k.bfloat16(), cos, cos)
    reference_layer.silu_and_mul(x.bfloat16())
    assert len(calls) == 4
