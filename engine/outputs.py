"""What the engine reports about a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    text: str  # detokenized generated text so far; a matched stop string is cut off
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" while finished, else None
    kv_bytes: int  # peak KV bytes the request held
    plan: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first prompt token: None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    stop_reason: str | int | None = field(default=None)  # the stop string or token that ended it
    # peak KV bytes held once the prompt was processed: what the request keeps while it
    # decodes, after select / dynamic heads shrank to their budgets (kv_bytes includes the
    # prefill peak, when those heads still hold the whole prompt)
    kv_bytes_decode: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
