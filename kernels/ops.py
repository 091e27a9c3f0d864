"""Dispatcher: CUDA tensors use the Triton kernels, CPU tensors the torch references.

`HEADWISE_KERNELS=reference|triton` forces either (Triton on CPU needs
`TRITON_INTERPRET=1`); it is read once, at import, and `force_backend` changes it later.
Every op has the signature of its reference in `headwise.kernels.reference`, which
documents shapes, the mask contract and the fp8 scales (`k_scale` / `v_scale`, None for a
cache in the model's dtype). Nothing here reads a device tensor back: the
ops run once per layer, so a decision that needs data is taken once per step on the host
and passed in (`max_seqlen`, `self_visible`).
"""

from __future__ import annotations

import functools
import inspect
import os
from types import ModuleType

import torch

from headwise.kernels import reference

_BACKENDS = ("reference", "triton")


def _parse_forced(value: str | None) -> str | None:
    value = (value or "").strip().lower()
    if value and value not in _BACKENDS:
        raise ValueError(f"HEADWISE_KERNELS={value!r}: expected one of {', '.join(_BACKENDS)}")
    return value or None


_forced: str | None = _parse_forced(os.environ.get("HEADWISE_KERNELS"))
_triton_ops: ModuleType | None = None


def force_backend(name: str | None) -> str | None:
    """Run every op on `name` ("reference" or "triton"), or on the tensors' default (None);
    returns the previous choice, to restore it."""
    global _forced
    previous, _forced = _forced, _parse_forced(name)
    return previous


def backend_for(t: torch.Tensor) -> ModuleType:
    """The module whose op runs on tensors like `t`."""
    global _triton_ops
    if (_forced or ("triton" if t.is_cuda else "reference")) == "reference":
        return reference
    if _triton_ops is None:
        from headwise.kernels import triton_ops  # imported lazily: triton is optional on CPU

        _triton_ops = triton_ops
    return _triton_ops


def kv_write(k, v, positions, slot_mapping, k_cache, v_cache, pos_cache, k_scale=None, v_scale=None) -> None:
    backend_for(k).kv_write(k, v, positions, slot_mapping, k_cache, v_cache, pos_cache, k_scale, v_scale)


def paged_decode(
    q, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent, q_pos, scale, k_scale=None, v_scale=None
):
    return backend_for(q).paged_decode(
        q, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent, q_pos, scale, k_scale, v_scale
    )


def paged_prefix(
    q,
    q_pos,
    q_seq,
    k_cache,
    v_cache,
    pos_cache,
    block_tables,
    rows,
    lengths,
    keep,
    recent,
    scale,
    k_scale=None,
    v_scale=None,
):
    return backend_for(q).paged_prefix(
        q, q_pos, q_seq, k_cache, v_cache, pos_cache, block_tables, rows, lengths, keep, recent, scale, k_scale, v_scale
    )


def sink_window_prefill(q, k, v, positions, cu_seqlens, sink, recent, scale):
    return backend_for(q).sink_window_prefill(q, k, v, positions, cu_seqlens, sink, recent, scale)


def merge_states(o1, lse1, o2, lse2):
    return backend_for(o1).merge_states(o1, lse1, o2, lse2)


def rms_norm(x, weight, eps):
    return backend_for(x).rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    return backend_for(x).add_rms_norm(x, residual, weight, eps)


def apply_rotary(q, k, cos, sin):
    return backend_for(q).apply_rotary(q, k, cos, sin)


def causal_prefill(q, k, v, cu_seqlens, scale, max_seqlen: int | None = None):
    """Full heads, nothing cached. On CUDA in fp16 / bf16: flash-attn when installed, else
    torch's varlen flash attention, both sync-free given the longest sequence `max_seqlen`
    (a host int; None reads it back from cu_seqlens). Else torch SDPA per sequence."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        varlen = _varlen_attention()
        if varlen is not None:
            n = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if max_seqlen is None else max_seqlen
            cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.int()
            return varlen(q, k, v, cu, n, scale)
    return reference.causal_prefill(q, k, v, cu_seqlens, scale)


@functools.cache
def _varlen_attention():
    """`f(q, k, v, cu_seqlens_int32, max_seqlen, scale)`: causal GQA varlen flash attention,
    or None. torch's `varlen_attn` is young (2.9+) and its keywords changed between
    releases, so it is used only where it takes a scale, GQA and a causal switch."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:
        return lambda q, k, v, cu, n, scale: flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True
        )
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    if not {"scale", "enable_gqa"} <= params.keys():
        return None
    return lambda q, k, v, cu, n, scale: varlen_attn(q, k, v, cu, cu, n, n, scale=scale, enable_gqa=True, **causal)


def prefill_attention(
    q,
    k,
    v,
    positions,
    seq_index,
    cu_seqlens,
    k_cache,
    v_cache,
    pos_cache,
    block_tables,
    rows,
    lengths,
    keep,
    sink,
    recent,
    scale,
    has_cache: bool,
    self_visible: bool | None = None,
    k_scale=None,
    v_scale=None,
):
    """Chunk queries over their sequence's cached slots and the chunk itself, with the
    docs/design.md position mask; returns `[T, Hq, D]`.

    Triton: paged_prefix + sink_window_prefill + merge_states. Reference (CPU): one
    masked fused SDPA per sequence (`reference.masked_prefill`), same mask, same output,
    when every head's window holds the query itself (`self_visible`: recent >= 1 for every
    head, a host bool; None reads it from `recent`).
    """
    be = backend_for(q)
    if be is reference:
        if self_visible is None:
            self_visible = bool((recent >= 1).all())
        if self_visible:
            if not has_cache:  # positions 0, 1, ...: the chunk's own keys only
                return reference.causal_prefill(q, k, v, cu_seqlens, scale, sink, recent)
            return reference.masked_prefill(
                q,
                k,
                v,
                positions,
                cu_seqlens,
                k_cache,
                v_cache,
                pos_cache,
                block_tables,
                rows,
                lengths,
                keep,
                sink,
                recent,
                scale,
                k_scale,
                v_scale,
            )
    o, lse = be.sink_window_prefill(q, k, v, positions, cu_seqlens, sink, recent, scale)
    if has_cache:
        oc, lsec = be.paged_prefix(
            q,
            positions,
            seq_index,
            k_cache,
            v_cache,
            pos_cache,
            block_tables,
            rows,
            lengths,
            keep,
            recent,
            scale,
            k_scale,
            v_scale,
        )
        o, _ = be.merge_states(o, lse, oc, lsec)
    return o
