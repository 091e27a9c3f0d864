"""Fault isolation inside a step: an exception that one request's data provokes fails that
request only, and the rest of the batch goes on.

Two tools, for the two shapes of per-request work in `LLMEngine._step`:
- `with guard(seq): ...` around work done for one request at a time (selection at the end
  of its prompt, its prompt logprobs, appending its token: detokenization, stop strings,
  logprobs, building its output);
- `isolate_rows(run, seqs, guard)` around batched work whose rows belong to different
  requests (the sampler: penalties, stop-token suppression, draws, one tensor op each).
  It runs the batch; only if that raises does it run each row alone under the guard, so
  the failure lands on the request(s) causing it and the others keep their results. The
  happy path costs nothing.

Everything else in a step (the forward pass, metadata building) stays unguarded: an
error there cannot be traced to one request and stops the engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from headwise.engine.sequence import Sequence

log = logging.getLogger(__name__)

T = TypeVar("T")


class RequestGuard:
    """`with guard(seq): ...` swallows an `Exception` raised by that block and hands it to
    `fail(seq, error)` once per request; `guard.ok(seq)` tells later stages of the step
    whether the request is still alive."""

    def __init__(self, fail: Callable[[Sequence, Exception], None]) -> None:
        self._fail = fail
        self.failed: dict[str, Exception] = {}

    @contextmanager
    def __call__(self, seq: Sequence) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            if seq.request_id in self.failed:
                return  # a later stage tripped over the same broken request: already failed
            self.failed[seq.request_id] = error
            log.error("request %s failed inside a step; the others go on", seq.request_id, exc_info=error)
            self._fail(seq, error)

    def ok(self, seq: Sequence) -> bool:
        return seq.request_id not in self.failed


def isolate_rows(run: Callable[[list[int]], list[T]], seqs: list[Sequence], guard: RequestGuard) -> list[T | None]:
    """`run(indices)` gives one result per index into `seqs`. Called once on every index;
    if that raises, called again on each index alone under `guard`: a row that still
    raises fails its request (its result is None), the others get theirs."""
    try:
        return list[T | None](run(list(range(len(seqs)))))
    except Exception as error:
        log.warning(
            "a batched step of %d requests raised (%s: %s); retrying them one by one to find the request(s) at fault",
            len(seqs),
            type(error).__name__,
            error,
        )
    results = list[T | None]([None] * len(seqs))
    for i, seq in enumerate(seqs):
        if guard.ok(seq):
            with guard(seq):
                results[i] = run([i])[0]
    return results
