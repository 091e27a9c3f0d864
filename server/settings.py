"""Server-side settings (not the engine's): flags with HEADWISE_<FLAG> environment defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int | None = None  # sub-requests in the engine at once (running + waiting); None: no cap
    served_model_name: str | None = None  # default: the engine's model id
    log_level: str = "info"
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")


def env_name(flag: str) -> str:
    """`--max-queue` -> `HEADWISE_MAX_QUEUE`."""
    return "HEADWISE_" + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default: T, convert: Callable[[str], T] = str) -> T:
    """The flag's environment variable converted, else `default`; a bad value names the variable."""
    raw = os.environ.get(env_name(flag))
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as e:
        raise ValueError(f"{env_name(flag)}={raw!r} is not valid: {e}") from None


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the HTTP side; each reads HEADWISE_<FLAG> as its default."""
    group = parser.add_argument_group("server")
    default = ServerSettings()

    def add(flag: str, value, convert=str, **kwargs) -> None:
        env = env_name(flag)
        group.add_argument(flag, default=env_default(flag, value, convert), type=convert,
                           help=f"{kwargs.pop('help')} (env {env}; default: %(default)s)", **kwargs)

    add("--host", default.host, help="address to bind; 0.0.0.0 to serve other machines")
    add("--port", default.port, int, help="port to bind")
    add("--api-key", default.api_key, help="require `Authorization: Bearer KEY` on /v1 and /tokenize")
    add("--max-queue", default.max_queue, int,
        help="most requests in the engine at once (running + waiting); more get HTTP 429")
    add("--served-model-name", default.served_model_name, help="model name clients send (default: the model id)")
    add("--log-level", default.log_level, choices=LOG_LEVELS, help="log level")
    add("--drain-timeout", default.drain_timeout, float,
        help="seconds SIGTERM waits for in-flight requests before exiting")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(host=args.host, port=args.port, api_key=args.api_key or None,
                          max_queue=args.max_queue, served_model_name=args.served_model_name,
                          log_level=args.log_level, drain_timeout=args.drain_timeout)
