"""A step's inputs: `StepInputs` (plain host values every rank runs, `build_step_inputs`) and
the attention metadata computed from them on the device from the persistent block tables.

The host sends one small int32 buffer per step (token ids, and per sequence its table row,
first position and token count); positions, the per-(layer, token, KV head) slot mapping,
lengths and masks are a handful of batched tensor ops over `BlockTables`' device tensors
(docs/design.md, "One engine step"). Nothing here loops over layers or heads, and nothing
reads a device value back, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headwise.engine.attention import AttentionMetadata, DecodeMeta, PrefillMeta
from headwise.engine.sequence import Sequence
from headwise.kvcache.block_tables import PARAMS, BlockTables, DeviceTables
from headwise.kvcache.prefill_selection import BoundedPrefill

GAP, RING, SINK, KEEP, RECENT = (PARAMS.index(n) for n in ("gap", "ring", "sink", "keep", "recent"))


def head_slots(params: torch.Tensor, pos: torch.Tensor, end: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each head's slot index for writing position `pos` (-1: not kept).

    params `[P, L, N, Hkv]` of the N tokens' rows, pos / end `[N]` (end: the first position
    after the token's chunk). Positional heads: pos - gap * block_size. Ring heads: sinks at
    their position, later positions in the ring after `keep`; a position that a later token
    of the same chunk overwrites (or any, with an empty ring) is dropped."""
    gap, ring, sink, keep = params[GAP], params[RING], params[SINK], params[KEEP]
    j, e = pos[None, :, None], end[None, :, None]
    in_ring = (ring >= 0) & (j >= sink)
    ring_slot = keep + (j - sink) % ring.clamp(min=1)
    slot = torch.where(ring >= 0, torch.where(in_ring, ring_slot, j), j - gap * block_size)
    dropped = in_ring & ((ring == 0) | (j < e - ring))
    return torch.where(dropped, torch.full_like(slot, -1), slot)


def head_lengths(params: torch.Tensor, n: torch.Tensor, block_size: int) -> torch.Tensor:
    """Valid slots of each head once `n [S]` positions are written: `[L, S, Hkv]`."""
    gap, ring, sink, keep = params[GAP], params[RING], params[SINK], params[KEEP]
    m = n[None, :, None]
    ring_len = torch.where(m <= sink, m, keep + torch.minimum(ring, m - sink))
    return torch.where(ring >= 0, ring_len, m - gap * block_size)


def flat_slots(
    tables: BlockTables | DeviceTables, rows: torch.Tensor, slot: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Head slot indices `[L, N, Hkv]` of tokens in table rows `rows [N]` -> pool slots."""
    layers, nrows, hkv, width = tables.dev.shape
    lidx = torch.arange(layers, device=slot.device)[:, None, None]
    hidx = torch.arange(hkv, device=slot.device)[None, None, :]
    idx = slot.clamp(min=0)
    flat = ((lidx * nrows + rows[None, :, None]) * hkv + hidx) * width + idx // block_size
    block = tables.dev.view(-1)[flat.clamp(max=tables.dev.numel() - 1)].long()
    return torch.where((slot >= 0) & (block >= 0), block * block_size + idx % block_size, torch.full_like(slot, -1))


def build_metadata(
    tables: BlockTables | DeviceTables,
    block_size: int,
    seq_info: torch.Tensor,
    num_prefill: int,
    num_prefill_tokens: int,
    num_tokens: int,
    width: int,
    max_seqlen: int,
    has_cache: bool,
    all_full: bool,
    self_visible: bool | None = None,
) -> AttentionMetadata:
    """Metadata of a step from `seq_info [3, S]` on the device: rows, first positions and
    token counts, prefill chunks first then decode sequences (one token each)."""
    rows, start, count = seq_info[0].long(), seq_info[1].long(), seq_info[2].long()
    device = seq_info.device
    s = rows.shape[0]
    cu = torch.zeros(s + 1, dtype=torch.long, device=device)
    cu[1:] = count.cumsum(0)
    seq_of = torch.repeat_interleave(torch.arange(s, device=device), count, output_size=num_tokens)
    positions = start[seq_of] + torch.arange(num_tokens, device=device) - cu[seq_of]
    token_rows = rows[seq_of]
    params = tables.dev_params[:, :, token_rows, :]  # [P, L, T, Hkv]
    slot = head_slots(params, positions, (start + count)[seq_of], block_size)
    meta = AttentionMetadata(
        positions=positions,
        slot_mapping=flat_slots(tables, token_rows, slot, block_size),
        block_tables=tables.dev[..., :width],
        prefill=None,
        decode=None,
    )
    seq_params = tables.dev_params[:, :, rows, :]  # [P, L, S, Hkv]
    if num_prefill:
        sp = seq_params[:, :, :num_prefill]
        meta.prefill = PrefillMeta(
            num_tokens=num_prefill_tokens,
            max_seqlen=max_seqlen,
            positions=positions[:num_prefill_tokens],
            seq_index=seq_of[:num_prefill_tokens],
            cu_seqlens=cu[: num_prefill + 1].int(),
            has_cache=has_cache,
            all_full=all_full,
            self_visible=self_visible,
            rows=rows[:num_prefill],
            lengths=head_lengths(sp, start[:num_prefill], block_size).int(),
            keep=sp[KEEP],
            sink=sp[SINK],
            recent=sp[RECENT],
        )
    if num_prefill < s:
        dp = seq_params[:, :, num_prefill:]
        pos = start[num_prefill:]
        meta.decode = DecodeMeta(
            num_tokens=s - num_prefill,
            rows=rows[num_prefill:],
            positions=pos,
            lengths=head_lengths(dp, pos + 1, block_size).int(),
            keep=dp[KEEP],
            recent=dp[RECENT],
        )
    return meta


@dataclass
class StepRows:
    seq: Sequence
    start: int  # first position computed this step
    end: int
    row: int  # first row of this sequence in the step's hidden states


@dataclass
class StepInputs:
    """One step as every rank runs it: token ids then per sequence (table row, first
    position, token count), prefill chunks first, and host-known flags."""

    packed: list[int]
    num_tokens: int
    num_seqs: int
    num_prefill: int
    num_prefill_tokens: int
    width: int  # widest table row of the batch
    max_seqlen: int
    has_cache: bool
    all_full: bool
    self_visible: bool  # every prefill head sees at least its own token
    # (table row, first step row, rows, whether it starts the request's window) to keep
    probes: list[tuple[int, int, int, bool]] = field(default_factory=list)
    # prompt chunks whose bounded select heads choose what they keep in the forward:
    # (table row, first step row, first position, rows, the request's BoundedPrefill)
    selections: list[tuple[int, int, int, int, BoundedPrefill]] = field(default_factory=list)


def build_step_inputs(
    scheduled: list[tuple[Sequence, int]], probe_window: dict[str, int]
) -> tuple[StepInputs, list[StepRows]]:
    """The step's inputs (prefill chunks first, then decode tokens) and where each sequence's
    rows are in its hidden states. A one-token prompt chunk of bounded select heads is a
    prefill chunk: its selection runs with the prefill's."""
    prefill = [(s, n) for s, n in scheduled if n > 1 or s.selects_in_forward()]
    decode = [(s, n) for s, n in scheduled if n == 1 and not s.selects_in_forward()]
    ids: list[int] = []
    rows: list[StepRows] = []
    probes: list[tuple[int, int, int, bool]] = []
    selections: list[tuple[int, int, int, int, BoundedPrefill]] = []
    info: list[list[int]] = [[], [], []]  # table row, first position, token count per sequence
    width = max_seqlen = 0
    has_cache, all_full, self_visible = False, True, True
    for i, (seq, n) in enumerate(prefill + decode):
        tables = seq.kv
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        rows.append(StepRows(seq, start, end, len(ids)))
        w = probe_window.get(seq.request_id)
        if w:
            lo = max(start, seq.num_prompt_tokens - w)
            hi = min(end, seq.num_prompt_tokens)
            if hi > lo:
                probes.append((tables.row, len(ids) + lo - start, hi - lo, lo == max(0, seq.num_prompt_tokens - w)))
        if seq.bounded is not None and seq.selects_in_forward():
            selections.append((tables.row, len(ids), start, n, seq.bounded))
        ids.extend(seq.all_token_ids[start:end])
        info[0].append(tables.row)
        info[1].append(start)
        info[2].append(n)
        width = max(width, int(tables.nent.max()))
        if i < len(prefill):
            max_seqlen = max(max_seqlen, n)
            has_cache |= start > 0
            all_full &= tables.all_unbounded
            self_visible &= tables.min_recent() >= 1
    inputs = StepInputs(
        ids + info[0] + info[1] + info[2],
        len(ids),
        len(info[0]),
        len(prefill),
        sum(n for _, n in prefill),
        width,
        max_seqlen,
        has_cache,
        all_full,
        self_visible,
        probes,
        selections,
    )
    return inputs, rows
