"""`--max-queue`: a cap on the engine requests this server has in flight (running + waiting).

Counted by the server rather than read from the engine, because a request reaches the
engine's queue only when its generator is first awaited: many handlers could otherwise
pass the check in the same event-loop turn and overshoot the cap."""

from __future__ import annotations

from collections.abc import Callable

from headwise.server.errors import APIError


class Admission:
    def __init__(self, max_queue: int | None, on_reject: Callable[[], None] = lambda: None) -> None:
        self.max_queue = max_queue
        self.in_flight = 0
        self._on_reject = on_reject

    def check(self, count: int) -> None:
        """HTTP 400 if `count` engine requests can never fit under --max-queue, 429 if they do
        not fit now; reserves nothing. Called before a request is tokenized, so a full server
        spends nothing on it."""
        if self.max_queue is None:
            return
        if count > self.max_queue:
            raise APIError(
                400,
                f"this request needs {count} engine requests (prompts x n) but --max-queue is {self.max_queue}: "
                "it can never be admitted; lower n or send fewer prompts",
                "n",
                "exceeds_max_queue",
            )
        if self.in_flight + count > self.max_queue:
            self._on_reject()
            raise APIError(
                429,
                f"the server is at capacity ({self.in_flight} of --max-queue {self.max_queue} "
                f"requests in flight; this one needs {count}); retry later",
                None,
                "queue_full",
            )

    def acquire(self, count: int) -> None:
        """Reserve `count` engine requests or raise (as `check`); never waits."""
        self.check(count)
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count
        assert self.in_flight >= 0, "released more requests than acquired"
