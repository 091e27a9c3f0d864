"""Paged attention of one layer over a flat batch: prefill chunks first, then decode tokens.

The model runner fills an `AttentionMetadata` once per step, on the device; every layer
reads its own slice (index 0 of the per-layer tensors). Block tables are the persistent
`[L, R, Hkv, W]` tables of the running requests; `rows` name each sequence's row. Order
inside a layer (docs/design.md, "KV cache"): chunk queries attend to the cached slots
(position mask) merged by log-sum-exp with causal attention inside the chunk, then the
chunk's K/V are written; decode tokens are written first and then attend to the visible
slots of their heads. An fp8 cache passes each layer's K / V scales to every op that reads
or writes it (kernels/kv_quant.py); the first prefill step calibrates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headwise.kernels import ops
from headwise.kernels.kv_quant import calibrated_scale
from headwise.kvcache.buffers import KVBuffers
from headwise.kvcache.prefill_selection import ChunkSelection, select_in_chunk


@dataclass
class PrefillMeta:
    num_tokens: int
    max_seqlen: int  # longest chunk (host int: no sync to size a kernel)
    positions: torch.Tensor  # [Tp]
    seq_index: torch.Tensor  # [Tp] index of the chunk's sequence in [0, Sp)
    cu_seqlens: torch.Tensor  # [Sp + 1] int32
    has_cache: bool  # any chunk with cached slots before it
    all_full: bool  # every head of every chunk unbounded: plain causal attention
    rows: torch.Tensor  # [Sp] table row of each chunk's sequence
    lengths: torch.Tensor  # [L, Sp, Hkv] cached slots before the chunk
    keep: torch.Tensor  # [L, Sp, Hkv]
    sink: torch.Tensor  # [L, Sp, Hkv]
    recent: torch.Tensor  # [L, Sp, Hkv]
    # every head's recent window holds the query itself (recent >= 1), a host bool for the
    # reference path's per-layer choice; None: read from `recent` (a device sync on CUDA)
    self_visible: bool | None = None


@dataclass
class DecodeMeta:
    num_tokens: int
    rows: torch.Tensor  # [Sd] table row of each sequence
    positions: torch.Tensor  # [Sd] the new token's position
    lengths: torch.Tensor  # [L, Sd, Hkv] valid slots after the new token is written
    keep: torch.Tensor  # [L, Sd, Hkv]
    recent: torch.Tensor  # [L, Sd, Hkv]


@dataclass
class SelectionProbe:
    """Rows whose queries and outputs feed head selection at the end of a prompt."""

    rows: torch.Tensor  # [R] row indices into the step's tokens
    q: list[torch.Tensor] = field(default_factory=list)  # per layer [R, Hq, D]
    out: list[torch.Tensor] = field(default_factory=list)  # per layer [R, Hq, D]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [L, T, Hkv] flat slot or -1
    block_tables: torch.Tensor  # [L, R, Hkv, W] (W may be trimmed to the batch's widest row)
    prefill: PrefillMeta | None
    decode: DecodeMeta | None
    probe: SelectionProbe | None = None
    # prompt chunks whose bounded select heads choose what they keep once the layer attended
    selections: list[ChunkSelection] | None = None


def paged_attention(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    buffers: KVBuffers,
    scale: float,
) -> torch.Tensor:
    """q `[T, Hq, D]`, k / v `[T, Hkv, D]` (RoPE applied) -> output `[T, Hq, D]`."""
    p, d = meta.prefill, meta.decode
    tp = p.num_tokens if p else 0
    ks, vs = buffers.scales(layer)
    if buffers.calibrating and p and ks is not None and vs is not None:  # fp8: the first prefill sets the scales
        ks.copy_(calibrated_scale(k[:tp], buffers.k.dtype))
        vs.copy_(calibrated_scale(v[:tp], buffers.v.dtype))
    pre = None
    if p and not p.has_cache and p.all_full:
        pre = ops.causal_prefill(q[:tp], k[:tp], v[:tp], p.cu_seqlens, scale, p.max_seqlen)
    elif p:
        pre = ops.prefill_attention(
            q[:tp],
            k[:tp],
            v[:tp],
            p.positions,
            p.seq_index,
            p.cu_seqlens,
            buffers.k,
            buffers.v,
            buffers.pos,
            meta.block_tables[layer],
            p.rows,
            p.lengths[layer],
            p.keep[layer],
            p.sink[layer],
            p.recent[layer],
            scale,
            p.has_cache,
            p.self_visible,
            ks,
            vs,
        )
    ops.kv_write(k, v, meta.positions, meta.slot_mapping[layer], buffers.k, buffers.v, buffers.pos, ks, vs)
    if meta.selections:
        select_in_chunk(layer, q, k, v, meta.selections, buffers, meta.block_tables[layer], scale)
    if d:
        o, _ = ops.paged_decode(
            q[tp:],
            buffers.k,
            buffers.v,
            buffers.pos,
            meta.block_tables[layer],
            d.rows,
            d.lengths[layer],
            d.keep[layer],
            d.recent[layer],
            d.positions,
            scale,
            ks,
            vs,
        )
        # a step of one kind returns its op's output as is: no scratch, no copy
        out = o if pre is None else torch.cat([pre, o])
    else:
        out = pre
    if meta.probe is not None:
        meta.probe.q.append(q[meta.probe.rows])
        meta.probe.out.append(out[meta.probe.rows])
    return out
