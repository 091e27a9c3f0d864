"""Server-side settings (not the engine's); `headwise serve` fills them from flags and env."""

from __future__ import annotations

from dataclasses import dataclass

LOG_LEVELS = ("debug", "info", "warning", "error")
# a prompt this large is already ~1M tokens of text, far past any context this engine serves
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int | None = None  # sub-requests in the engine at once (running + waiting); None: no cap
    served_model_name: str | None = None  # default: the engine's model id
    log_level: str = "info"
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413 before parsing

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not self.drain_timeout >= 0:  # `not >=` also refuses NaN
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
