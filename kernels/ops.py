"""Dispatcher: CUDA tensors use the Triton kernels, CPU tensors the torch references.

`HEADWISE_KERNELS=reference|triton` forces either (Triton on CPU needs
`TRITON_INTERPRET=1`). Every op has the signature of its reference in
`headwise.kernels.reference`, which documents shapes and the mask contract.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from headwise.kernels import reference

_BACKENDS = ("reference", "triton")


def _forced() -> str | None:
    value = os.environ.get("HEADWISE_KERNELS", "").strip().lower()
    if value and value not in _BACKENDS:
        raise ValueError(f"HEADWISE_KERNELS={value!r}: expected one of {', '.join(_BACKENDS)}")
    return value or None


def backend_for(t: torch.Tensor) -> ModuleType:
    """The module whose op runs on tensors like `t`."""
    choice = _forced() or ("triton" if t.is_cuda else "reference")
    if choice == "reference":
        return reference
    from headwise.kernels import triton_ops  # imported lazily: triton is optional on CPU

    return triton_ops


def kv_write(k, v, positions, slot_mapping, k_cache, v_cache, pos_cache) -> None:
    backend_for(k).kv_write(k, v, positions, slot_mapping, k_cache, v_cache, pos_cache)


def paged_decode(q, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent, q_pos, scale):
    return backend_for(q).paged_decode(q, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent,
                                       q_pos, scale)


def paged_prefix(q, q_pos, q_seq, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent, scale):
    return backend_for(q).paged_prefix(
        q, q_pos, q_seq, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent, scale
    )


def sink_window_prefill(q, k, v, positions, cu_seqlens, sink, recent, scale):
    return backend_for(q).sink_window_prefill(q, k, v, positions, cu_seqlens, sink, recent, scale)


def merge_states(o1, lse1, o2, lse2):
    return backend_for(o1).merge_states(o1, lse1, o2, lse2)


def causal_prefill(q, k, v, cu_seqlens, scale):
    """Full heads, nothing cached: flash-attn when installed on CUDA, else torch SDPA."""
    if q.is_cuda:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            pass
        else:
            n = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            return flash_attn_varlen_func(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)
    return reference.causal_prefill(q, k, v, cu_seqlens, scale)


def prefill_attention(q, k, v, positions, seq_index, cu_seqlens, k_cache, v_cache, pos_cache, block_tables, rows,
                      lengths, keep, sink, recent, scale, has_cache: bool):
    """Chunk queries over their sequence's cached slots and the chunk itself, with the
    docs/design.md position mask; returns `[T, Hq, D]`.

    Triton: paged_prefix + sink_window_prefill + merge_states. Reference (CPU): one
    masked fused SDPA per sequence (`reference.masked_prefill`), same mask, same output.
    """
    be = backend_for(q)
    if be is reference and bool((recent >= 1).all()):
        return reference.masked_prefill(q, k, v, positions, cu_seqlens, k_cache, v_cache, pos_cache,
                                        block_tables, rows, lengths, keep, sink, recent, scale)
    o, lse = be.sink_window_prefill(q, k, v, positions, cu_seqlens, sink, recent, scale)
    if has_cache:
        oc, lsec = be.paged_prefix(q, positions, seq_index, k_cache, v_cache, pos_cache, block_tables, rows,
                                   lengths, keep, recent, scale)
        o, _ = be.merge_states(o, lse, oc, lsec)
    return o
