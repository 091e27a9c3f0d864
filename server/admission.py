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

    def acquire(self, count: int) -> None:
        """Reserve `count` engine requests or raise HTTP 429; never waits."""
        if self.max_queue is not None and self.in_flight + count > self.max_queue:
            self._on_reject()
            raise APIError(
                429,
                f"the server is at capacity ({self.in_flight} of --max-queue {self.max_queue} "
                f"requests in flight; this one needs {count}); retry later",
                None,
                "queue_full",
            )
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count
        assert self.in_flight >= 0, "released more requests than acquired"
