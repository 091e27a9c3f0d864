"""Why a request ends after a sampled token, checked in this order: EOS (unless
`ignore_eos`), a stop token id, a stop string (none of them before `min_tokens`), then
`max_tokens` or the model's context."""

from __future__ import annotations

from headwise.engine.detokenizer import Detokenizer
from headwise.engine.sequence import Sequence


def finish_reason(
    seq: Sequence, token: int, new_chars: int, detok: Detokenizer, eos_ids: tuple[int, ...], max_model_len: int
) -> tuple[str, str | int | None] | None:
    """(finish_reason, stop_reason) once `token` is appended to `seq` (its text grew by
    `new_chars`), or None while it goes on."""
    p = seq.params
    n_out = len(seq.output_token_ids)
    if seq.grammar is not None and seq.grammar.terminated:  # it took EOS: nothing more may follow
        return "stop", None
    if n_out >= p.min_tokens:
        if not p.ignore_eos and token in eos_ids:
            return "stop", None
        if token in p.stop_token_ids:
            return "stop", token
        hit = detok.find_stop(seq, new_chars)
        if hit is not None:
            return "stop", hit
    if n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        return "length", None
    return None
