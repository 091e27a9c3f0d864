"""Turn a validated request body into the engine's SamplingParams, one per choice."""

from __future__ import annotations

import re

from headwise.engine.grammar_spec import GrammarSpec
from headwise.engine.sampling_params import SEED_MIN, InvalidRequest, SamplingParams
from headwise.server.protocol import TOKEN_KEY, ChatCompletionRequest, CompletionRequest, GenerationRequest

# OpenAI's default for /v1/completions; chat defaults to the rest of the context
COMPLETION_DEFAULT_MAX_TOKENS = 16


def max_tokens(body: GenerationRequest, prompt_len: int, max_model_len: int, default: int | None = None) -> int:
    """The explicit limit, else `default` (generation_config.json's max_new_tokens, within
    the context), else the endpoint's default; at least 1 so an over-long prompt reaches the
    engine's context check instead of a max_tokens error."""
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None:
        return limit
    if default is not None:
        return max(1, min(default, max_model_len - prompt_len))
    if isinstance(body, CompletionRequest):
        return COMPLETION_DEFAULT_MAX_TOKENS
    return max(1, max_model_len - prompt_len)


def logprobs_k(body: GenerationRequest) -> int | None:
    """Top alternatives per generated token, or None when logprobs are not asked for."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def choice_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped around the signed 64-bit range so the largest seed stays valid."""
    return (seed + choice - SEED_MIN) % 2**64 + SEED_MIN


def logit_bias(body: GenerationRequest) -> dict[int, float] | None:
    """OpenAI's `logit_bias` keys are token ids written as strings."""
    if not body.logit_bias:
        return None
    out = {}
    for key, bias in body.logit_bias.items():
        if not re.fullmatch(TOKEN_KEY, key):  # "+1", " 1", "1_0" are not how ids are written
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        out[int(key)] = bias
    return out


def sampling_params(
    body: GenerationRequest,
    prompt_len: int,
    max_model_len: int,
    choice: int,
    defaults: dict | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """Params for choice `choice` of n; a given seed becomes seed + choice so choices differ
    yet the whole response stays reproducible. `defaults` (--generation-config) fill the
    sampling fields the body leaves unset; `grammar` constrains the output (server/structured.py)."""
    defaults = defaults or {}
    chosen = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
    }
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    echo_logprobs = isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None
    chosen = {name: defaults.get(name) if value is None else value for name, value in chosen.items()}
    return SamplingParams(
        max_tokens=max_tokens(body, prompt_len, max_model_len, defaults.get("max_tokens")),
        seed=None if body.seed is None else choice_seed(body.seed, choice),
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs_k(body),
        prompt_logprobs=body.logprobs if echo_logprobs else None,
        logit_bias=logit_bias(body),
        grammar=grammar,
        **{name: value for name, value in chosen.items() if value is not None},
    )
