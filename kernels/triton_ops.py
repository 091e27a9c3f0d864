"""Triton implementation of every kernel op, with the signatures of `reference`.

`headwise.kernels.reference` documents shapes, the cache layout and the mask contract;
these functions launch the kernels in `triton_decode`, `triton_prefix`, `triton_prefill`,
`triton_kv_write`, `triton_merge`, `triton_norm` and `triton_rope`. With HEADWISE_DEBUG=1
(`headwise.kernels.debug`) they first check their inputs (ValueError names the bad
argument); without it they only launch, since they run once per layer per step.
Accumulation is fp32; q / k / v / caches are float16, bfloat16 or float32, all of one
dtype, or the caches are fp8 (e4m3 / e5m2) with float32 scales per KV head. Index tensors may be int32 or int64. On CPU this needs TRITON_INTERPRET=1.

Preconditions the reference does not need:
- kv_write: no slot appears twice in one call (a ring that wraps inside a chunk drops the
  overwritten rows with -1, as the budget keeps only the newest).
- sink_window_prefill: positions increase strictly inside each sequence, as they do in a
  prefill chunk; this is what lets the kernel skip fully masked tiles.
"""

from __future__ import annotations

import torch

from headwise.kernels.debug import CHECKS
from headwise.kernels.kv_quant import is_fp8
from headwise.kernels.triton_common import (
    check_attention_dtype,
    check_cache,
    check_int,
    check_same_device,
    require,
)
from headwise.kernels.triton_decode import launch_decode
from headwise.kernels.triton_kv_write import launch_kv_write
from headwise.kernels.triton_merge import launch_merge
from headwise.kernels.triton_norm import launch_rms_norm
from headwise.kernels.triton_prefill import launch_sink_window
from headwise.kernels.triton_prefix import launch_prefix
from headwise.kernels.triton_rope import launch_rotary

__all__ = [
    "kv_write",
    "paged_decode",
    "paged_prefix",
    "sink_window_prefill",
    "merge_states",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
]


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index [rows, heads, D] tensors by row/head strides but need a unit D stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_heads(name: str, hq: int, hkv: int) -> None:
    require(hkv > 0 and hq % hkv == 0, f"{name}: {hq} query heads is not a multiple of {hkv} KV heads")


def _check_scales(k_cache: torch.Tensor, k_scale, v_scale, hkv: int) -> None:
    """An fp8 cache comes with float32 scales `[Hkv]`; a cache in the model's dtype without."""
    if not is_fp8(k_cache.dtype):
        require(k_scale is None and v_scale is None, f"k_scale / v_scale given for a {k_cache.dtype} cache")
        return
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        require(s is not None, f"{name} is required with a {k_cache.dtype} cache")
        require(s.dtype == torch.float32 and tuple(s.shape) == (hkv,), f"{name} must be float32 [{hkv}]")


def _check_cache_dtype(name: str, cache: torch.Tensor, like: torch.Tensor | None) -> None:
    if is_fp8(cache.dtype):
        return
    check_attention_dtype(name, cache, like)


def _check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    require(q.dim() == 3, f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    check_attention_dtype("q", q)
    _check_cache_dtype("k_cache", k_cache, q)
    _check_cache_dtype("v_cache", v_cache, q)
    require(v_cache.dtype == k_cache.dtype, f"v_cache.dtype={v_cache.dtype} != k_cache.dtype={k_cache.dtype}")
    check_cache("k_cache", k_cache, q.shape[2])
    check_cache("v_cache", v_cache, q.shape[2])
    require(v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    require(
        block_tables.dim() == 3, f"block_tables must be [seqs, kv_heads, max_blocks], got {tuple(block_tables.shape)}"
    )
    check_int("block_tables", block_tables, tuple(block_tables.shape))
    _check_heads("q", q.shape[1], block_tables.shape[1])


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v `[T, Hkv, D]` to flat slots `slot_mapping [T, Hkv]` (-1 = drop); an fp8
    cache stores `x / scale` per KV head."""
    if CHECKS:
        _check_kv_write(k, v, positions, slot_mapping, k_cache, v_cache, pos_cache)
        _check_scales(k_cache, k_scale, v_scale, k.shape[1])
    launch_kv_write(
        _rows_contiguous(k),
        _rows_contiguous(v),
        positions.contiguous(),
        slot_mapping,
        k_cache,
        v_cache,
        pos_cache,
        k_scale,
        v_scale,
    )


def _check_kv_write(k, v, positions, slot_mapping, k_cache, v_cache, pos_cache) -> None:
    require(k.dim() == 3, f"k must be [tokens, kv_heads, head_dim], got {tuple(k.shape)}")
    require(v.shape == k.shape, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    t, hkv, d = k.shape
    _check_cache_dtype("k_cache", k_cache, None)
    require(v_cache.dtype == k_cache.dtype, f"v_cache.dtype={v_cache.dtype} != k_cache.dtype={k_cache.dtype}")
    check_cache("k_cache", k_cache, d)
    check_cache("v_cache", v_cache, d)
    require(v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    check_int("positions", positions, (t,))
    check_int("slot_mapping", slot_mapping, (t, hkv))
    check_int("pos_cache", pos_cache, tuple(k_cache.shape[:2]))
    check_same_device(k=k, v=v, positions=positions, slot_mapping=slot_mapping, k_cache=k_cache, pos_cache=pos_cache)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    recent: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence, `q [B, Hq, D]` at `q_pos [B]`, over the valid slots of its
    row `rows[b]` of `block_tables [R, Hkv, W]` with the (keep, recent) mask.

    Returns out `[B, Hq, D]` and lse `[B, Hq]` (fp32, natural log).
    """
    if CHECKS:
        _check_paged(q, k_cache, v_cache, block_tables)
        b = q.shape[0]
        heads = (b, block_tables.shape[1])
        check_int("rows", rows, (b,))
        check_int("q_pos", q_pos, (b,))
        check_int("pos_cache", pos_cache, tuple(k_cache.shape[:2]))
        for name, x in (("lengths", lengths), ("keep", keep), ("recent", recent)):
            check_int(name, x, heads)
        require(block_tables.stride(-1) == 1, "block_tables must have a unit stride along its blocks")
        check_same_device(q=q, k_cache=k_cache, block_tables=block_tables, rows=rows, lengths=lengths, q_pos=q_pos)
        _check_scales(k_cache, k_scale, v_scale, block_tables.shape[1])
    return launch_decode(
        _rows_contiguous(q),
        k_cache,
        v_cache,
        pos_cache,
        block_tables,
        rows,
        lengths,
        keep,
        recent,
        q_pos,
        float(scale),
        k_scale,
        v_scale,
    )


def paged_prefix(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    q_seq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
    recent: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk queries `q [T, Hq, D]` against the cached slots of their sequence q_seq in
    [0, S), whose table is row `rows[s]` of `block_tables [R, Hkv, W]`.

    Returns out `[T, Hq, D]` and lse `[T, Hq]`.
    """
    if CHECKS:
        _check_paged(q, k_cache, v_cache, block_tables)
        t = q.shape[0]
        heads = (rows.shape[0], block_tables.shape[1])
        check_int("rows", rows, tuple(rows.shape))
        check_int("q_pos", q_pos, (t,))
        check_int("q_seq", q_seq, (t,))
        check_int("pos_cache", pos_cache, tuple(k_cache.shape[:2]))
        for name, x in (("lengths", lengths), ("keep", keep), ("recent", recent)):
            check_int(name, x, heads)
        check_same_device(q=q, q_pos=q_pos, q_seq=q_seq, k_cache=k_cache, block_tables=block_tables, lengths=lengths)
        require(block_tables.stride(-1) == 1, "block_tables must have a unit stride along its blocks")
        _check_scales(k_cache, k_scale, v_scale, block_tables.shape[1])
    return launch_prefix(
        _rows_contiguous(q),
        q_pos.contiguous(),
        q_seq.contiguous(),
        k_cache,
        v_cache,
        pos_cache,
        block_tables,
        rows.contiguous(),
        lengths,
        keep,
        recent,
        float(scale),
        k_scale,
        v_scale,
    )


def sink_window_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sink: torch.Tensor,
    recent: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention inside each chunk with the per-head (sink, recent) mask.

    Returns out `[T, Hq, D]` and lse `[T, Hq]`.
    """
    if CHECKS:
        _check_sink_window(q, k, v, positions, cu_seqlens, sink, recent)
    return launch_sink_window(
        _rows_contiguous(q),
        _rows_contiguous(k),
        _rows_contiguous(v),
        positions.contiguous(),
        cu_seqlens.contiguous(),
        sink,
        recent,
        float(scale),
    )


def _check_sink_window(q, k, v, positions, cu_seqlens, sink, recent) -> None:
    require(
        q.dim() == 3 and k.dim() == 3,
        f"q, k must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}",
    )
    require(v.shape == k.shape, f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    t, hq, d = q.shape
    require(k.shape[0] == t and k.shape[2] == d, f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    check_attention_dtype("q", q)
    check_attention_dtype("k", k, q)
    check_attention_dtype("v", v, q)
    _check_heads("q", hq, k.shape[1])
    check_int("positions", positions, (t,))
    require(
        cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 1,
        f"cu_seqlens must be [seqs + 1], got {tuple(cu_seqlens.shape)}",
    )
    check_int("cu_seqlens", cu_seqlens, tuple(cu_seqlens.shape))
    heads = (cu_seqlens.shape[0] - 1, k.shape[1])
    check_int("sink", sink, heads)
    check_int("recent", recent, heads)
    check_same_device(q=q, k=k, positions=positions, cu_seqlens=cu_seqlens, sink=sink, recent=recent)


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax states over disjoint key sets: `[..., D]`, `[...]`."""
    if CHECKS:
        _check_merge(o1, lse1, o2, lse2)
    return launch_merge(o1, lse1, o2, lse2)


def _check_merge(o1, lse1, o2, lse2) -> None:
    require(o1.shape == o2.shape, f"o1 shape {tuple(o1.shape)} != o2 shape {tuple(o2.shape)}")
    require(o1.dim() >= 1, "o1 must have a head_dim axis")
    require(
        lse1.shape == o1.shape[:-1] and lse2.shape == o1.shape[:-1],
        f"lse shapes {tuple(lse1.shape)}, {tuple(lse2.shape)} must equal o1.shape[:-1] = {tuple(o1.shape[:-1])}",
    )
    check_attention_dtype("o1", o1)
    check_same_device(o1=o1, lse1=lse1, o2=o2, lse2=lse2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / rms(x))` over the last axis of x `[..., H]`; weight `[H]` in x's dtype."""
    if CHECKS:
        _check_norm(x, None, weight)
    y, _ = launch_rms_norm(_as_rows(x), None, weight, eps)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual`; returns `(rms_norm(s), s)`."""
    if CHECKS:
        _check_norm(x, residual, weight)
    y, s = launch_rms_norm(_as_rows(x), _as_rows(residual), weight, eps)
    assert s is not None  # a residual in, its sum out
    return y.view(x.shape), s.view(x.shape)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """`[rows, H]` with a unit stride along H (a view when x allows it)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _check_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    require(x.dim() >= 1, "x must have a hidden axis")
    check_attention_dtype("x", x)
    require(weight.shape == (x.shape[-1],), f"weight shape {tuple(weight.shape)}: expected ({x.shape[-1]},)")
    require(weight.dtype == x.dtype, f"weight.dtype={weight.dtype} differs from x.dtype {x.dtype}")
    require(weight.stride(0) == 1, f"weight must be contiguous (stride {weight.stride(0)})")
    if residual is not None:
        require(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        require(residual.dtype == x.dtype, f"residual.dtype={residual.dtype} differs from x.dtype {x.dtype}")
        check_same_device(x=x, residual=residual, weight=weight)
    else:
        check_same_device(x=x, weight=weight)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q `[T, Hq, D]` and k `[T, Hkv, D]` by fp32 cos / sin `[T, D / 2]`; new tensors."""
    if CHECKS:
        _check_rotary(q, k, cos, sin)
    c = cos if cos.stride(-1) == 1 else cos.contiguous()
    s = sin if sin.stride(-1) == 1 else sin.contiguous()
    return launch_rotary(_rows_contiguous(q), _rows_contiguous(k), c, s)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    require(
        q.dim() == 3 and k.dim() == 3, f"q, k must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}"
    )
    t, _, d = q.shape
    require(k.shape[0] == t and k.shape[2] == d, f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    require(d % 2 == 0, f"head_dim {d} must be even")
    check_attention_dtype("q", q)
    check_attention_dtype("k", k, q)
    for name, x in (("cos", cos), ("sin", sin)):
        require(x.shape == (t, d // 2), f"{name} shape {tuple(x.shape)}: expected {(t, d // 2)}")
        require(x.dtype == torch.float32, f"{name}.dtype={x.dtype}: expected torch.float32")
    check_same_device(q=q, k=k, cos=cos, sin=sin)
