"""A request's RequestOutput at a step: cumulative tokens, text, log-probabilities, K/V
bytes and timestamps."""

from __future__ import annotations

from headwise.engine.outputs import RequestOutput, Snapshot
from headwise.engine.sequence import Sequence
from headwise.kvcache.manager import KVCacheManager


def request_output(seq: Sequence, block_bytes: int) -> RequestOutput:
    # running: snapshots of the growing lists, O(1) per step; finished: plain lists,
    # one copy per request
    cumulative = list if seq.finished else Snapshot
    peak = max(seq.peak_blocks, seq.kv.peak_blocks if seq.has_kv else 0)
    return RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=seq.prompt_token_ids,
        token_ids=cumulative(seq.output_token_ids),
        text=seq.text,
        finished=seq.finished,
        finish_reason=seq.finish_reason,
        kv_bytes=peak * block_bytes,
        plan=seq.plan.name,
        logprobs=cumulative(seq.logprobs) if seq.params.logprobs is not None else None,
        prompt_logprobs=cumulative(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
        arrival_time=seq.arrival_time,
        first_scheduled_time=seq.first_scheduled_time,
        first_token_time=seq.first_token_time,
        finished_time=seq.finished_time,
        num_preemptions=seq.num_preemptions,
        stop_reason=seq.stop_reason,
        kv_bytes_decode=seq.decode_peak_blocks * block_bytes,
        num_cached_tokens=seq.num_cached_tokens or 0,
        error=seq.error,
    )


def kv_bytes_saved(seq: Sequence, kv_manager: KVCacheManager) -> int:
    """K/V bytes the full cache would have held for a finished request beyond its peak."""
    written = seq.num_tokens - 1  # the last sampled token is never fed back
    full = kv_manager.num_layers * kv_manager.num_kv_heads * -(-written // kv_manager.block_size)
    return max(0, full - seq.peak_blocks) * kv_manager.block_bytes
