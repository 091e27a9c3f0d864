"""What the engine reports about a request after each step."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, overload

T = TypeVar("T")


class Snapshot(Sequence[T]):
    """The first n items of an append-only list, shared instead of copied: what the list
    held when the snapshot was taken, whatever is appended later. Read-only; slicing
    gives a list. A running request's outputs carry these, so reporting a step costs O(1)
    in the request's length instead of a copy of every token and logprob so far."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list[T]):
        self._items, self._n = items, len(items)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            return self._items[start:stop:step] if step > 0 else [self._items[j] for j in range(start, stop, step)]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items")
        return self._items[j]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Snapshot, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Snapshot({list(self)!r})"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """One request after a step. The cumulative fields (token_ids, logprobs,
    prompt_logprobs) are Snapshots while the request runs and plain lists once it has
    finished; stream the new items as `out.token_ids[sent:]`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: Sequence[int]  # every generated token so far
    text: str  # detokenized generated text so far; a matched stop string is cut off
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" while finished, else None
    kv_bytes: int  # peak KV bytes the request held
    plan: str
    logprobs: Sequence[TokenLogprob] | None = None
    prompt_logprobs: Sequence[TokenLogprob | None] | None = None  # first prompt token: None
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
    # why the engine failed this request (finish_reason "error"): "ExceptionType: message"
    error: str | None = None
