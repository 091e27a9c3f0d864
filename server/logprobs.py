"""Engine TokenLogprobs in the two OpenAI shapes: completions (parallel lists) and chat
(`content` entries with bytes)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from headwise.engine.outputs import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf; vLLM reports the same floor


class TokenText:
    """Token id -> its text, cached: the same few thousand ids recur in every response."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], token_text: TokenText, token_ids: Sequence[int], text_offset: int
) -> dict:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` for consecutive tokens;
    a None entry (the first prompt token, which has no context) gives null values."""
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        text = token_text(token_id)
        result["tokens"].append(text)
        result["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            result["token_logprobs"].append(None)
            result["top_logprobs"].append(None)
            continue
        result["token_logprobs"].append(_finite(entry.logprob))
        result["top_logprobs"].append({token_text(i): _finite(lp) for i, lp in entry.top})
    return result


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    }
