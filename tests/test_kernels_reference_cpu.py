"""The CPU serving path's prefill attention (kernels/reference_cpu.py: masked_prefill) against
the paged references it fuses (paged_prefix + sink_window_prefill + merge_states) and plain
dense attention with the docs/design.md mask; oracle and tolerance as in
tests/test_kernels_reference.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from headwise.kernels import reference as ref
from headwise.kernels import reference_cpu
from headwise.kernels.layout import UNBOUNDED
from headwise.kernels.triton_cases import prefill_in_chunks
from tests.reference_cases import (
    SETTINGS,
    assert_close,
    dense_attention,
    make_tokens,
    new_cache,
    workloads,
)


@SETTINGS
@given(workloads(max_len=30), st.integers(1, 9))
def test_masked_prefill_equals_prefix_merged_with_chunk_attention(w, chunk):
    """The CPU serving path (one masked SDPA over cached slots + chunk) gives the output of
    paged_prefix + sink_window_prefill + merge_states, chunk after chunk, rings wrapping."""
    lens, g, sink, recent, seed = w
    hkv = sink.shape[1]
    q, k, v, gen = make_tokens(lens, hkv, g, seed)
    caches = [new_cache(lens, sink, recent, torch.Generator().manual_seed(seed)) for _ in range(2)]
    expected, _ = prefill_in_chunks(ref, caches[0], q, k, v, lens, sink, recent, chunk, 0.3)

    class Fused:  # prefill_in_chunks' ops, with the chunk attention replaced by masked_prefill
        kv_write = staticmethod(ref.kv_write)

        def paged_prefix(self, qc, pos, seq, kc, vc, pc, tables, rows, lengths, keep, rec, scale):
            self.args = (pos, kc, vc, pc, tables, rows, lengths, keep)
            return torch.zeros_like(qc), torch.zeros(qc.shape[:2])

        def sink_window_prefill(self, qc, kk, vv, pos, cu, snk, rec, scale):
            _, kc, vc, pc, tables, rows, lengths, keep = self.args
            return ref.masked_prefill(
                qc, kk, vv, pos, cu, kc, vc, pc, tables, rows, lengths, keep, snk, rec, scale
            ), None

        @staticmethod
        def merge_states(o1, l1, o2, l2):
            return o2, torch.zeros(o2.shape[:2])

    actual, _ = prefill_in_chunks(Fused(), caches[1], q, k, v, lens, sink, recent, chunk, 0.3)
    assert_close(actual, expected)


@pytest.mark.parametrize("window", [UNBOUNDED, 40, 20])
def test_masked_prefill_of_whole_history_chunks_uses_flash_and_equals_dense(monkeypatch, window):
    """Chunks whose every head sees its whole history (full heads, or a window wider than the
    prompt so far) run as causal + cached flash calls merged by log-sum-exp, no mask; they
    equal dense attention. A window of 20 covers the first chunks of a 30-token prompt only:
    the later ones take the masked path, and the output is the same."""
    lens, g, hkv = [30, 7], 3, 2
    sink = torch.zeros(2, hkv, dtype=torch.int32)
    recent = torch.full((2, hkv), window, dtype=torch.int32)
    q, k, v, gen = make_tokens(lens, hkv, g, 5)
    cache = new_cache(lens, sink, recent, gen)
    calls = []
    real = reference_cpu.flash_cpu
    monkeypatch.setattr(reference_cpu, "flash_cpu", lambda *a: calls.append(a[3]) or real(*a))

    class Fused:  # as in test_masked_prefill_equals_prefix_merged_with_chunk_attention
        kv_write = staticmethod(ref.kv_write)

        def paged_prefix(self, qc, pos, seq, kc, vc, pc, tables, rows, lengths, keep, rec, scale):
            self.args = (pos, kc, vc, pc, tables, rows, lengths, keep)
            return torch.zeros_like(qc), torch.zeros(qc.shape[:2])

        def sink_window_prefill(self, qc, kk, vv, pos, cu, snk, rec, scale):
            _, kc, vc, pc, tables, rows, lengths, keep = self.args
            return ref.masked_prefill(
                qc, kk, vv, pos, cu, kc, vc, pc, tables, rows, lengths, keep, snk, rec, scale
            ), None

        @staticmethod
        def merge_states(o1, l1, o2, l2):
            return o2, torch.zeros(o2.shape[:2])

    actual, _ = prefill_in_chunks(Fused(), cache, q, k, v, lens, sink, recent, 8, 0.3)
    for s, n in enumerate(lens):
        a = sum(lens[:s])
        pos = torch.arange(n)
        expected, _ = dense_attention(q[a : a + n], pos, k[a : a + n], v[a : a + n], pos, sink[s], recent[s], 0.3)
        assert_close(actual[a : a + n], expected)
    # chunks: seq 0 at 0, 8, 16, 24 (last positions 7, 15, 23, 29), seq 1 at 0 (last 6);
    # a causal call per flash chunk, a cached one per flash chunk after the first of seq 0
    assert calls.count(True) == {UNBOUNDED: 5, 40: 5, 20: 3}[window]
    assert calls.count(False) == {UNBOUNDED: 3, 40: 3, 20: 1}[window]


def test_whole_history_chunk_over_heads_holding_different_slot_counts_equals_dense(monkeypatch):
    """Bounded select heads hold fewer slots than full heads (their candidates), all visible:
    the chunk still takes the flash path, one cached call per slot count, and equals dense
    attention over each head's own slots and the chunk (causal)."""
    gen = torch.Generator().manual_seed(7)
    hkv, g, d, bs, n = 3, 2, 8, 4, 5
    held = [12, 5, 0]  # slots per KV head, all written before the chunk
    k_cache, v_cache = torch.randn(16, bs, d, generator=gen), torch.randn(16, bs, d, generator=gen)
    pos_cache = torch.zeros(16, bs, dtype=torch.int32)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], dtype=torch.int32)
    for h in range(hkv):  # kept positions < 20, in slot order
        pos_cache.view(-1)[table[h, :4].long().repeat_interleave(bs) * bs + torch.arange(4 * bs) % bs] = torch.arange(
            16, dtype=torch.int32
        )
    q = torch.randn(n, hkv * g, d, generator=gen)
    k, v = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
    positions = torch.arange(20, 20 + n)
    big = torch.full((1, hkv), 2**30, dtype=torch.int32)
    lengths = torch.tensor([held], dtype=torch.int32)
    calls = []
    real = reference_cpu.flash_cpu
    monkeypatch.setattr(reference_cpu, "flash_cpu", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    out = ref.masked_prefill(
        q,
        k,
        v,
        positions,
        torch.tensor([0, n], dtype=torch.int32),
        k_cache,
        v_cache,
        pos_cache,
        table[None],
        torch.tensor([0]),
        lengths,
        lengths,
        torch.zeros(1, hkv, dtype=torch.int32),
        big,
        0.3,
    )
    for h in range(hkv):
        slots = table[h].long().repeat_interleave(bs) * bs + torch.arange(4 * bs) % bs
        kc, vc = k_cache.view(-1, d)[slots[: held[h]]], v_cache.view(-1, d)[slots[: held[h]]]
        keys, values = torch.cat([kc, k[:, h]]), torch.cat([vc, v[:, h]])
        mask = torch.cat([torch.ones(n, held[h], dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
        for j in range(g):
            s = (q[:, h * g + j] @ keys.T * 0.3).masked_fill(~mask, float("-inf"))
            assert_close(out[:, h * g + j], s.softmax(-1) @ values)
    assert calls == [True, False, False]  # the chunk causally, then 5 and 12 cached slots
