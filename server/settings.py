"""Server-side settings (not the engine's); `headwise serve` fills them from flags and env."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error")
# a prompt this large is already ~1M tokens of text, far past any context this engine serves
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
# engine requests (prompts x n) one HTTP request may become: a batch of 10,000 prompts
# would otherwise fill the engine's queue for minutes from one call
DEFAULT_MAX_PROMPTS_PER_REQUEST = 256
# a client must finish sending its request line and headers within this (slow loris), and
# its body within the other; 4 MiB in 60 s is ~70 KB/s
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0
# vLLM's: model (generation_config.json next to the weights), vllm (none), or a folder
GENERATION_CONFIG_SOURCES = ("auto", "vllm")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int | None = None  # sub-requests in the engine at once (running + waiting); None: no cap
    # names clients may send; the first is the one responses carry. Default: the engine's model id
    served_model_name: str | tuple[str, ...] | list[str] | None = None
    log_level: str = "info"
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413 before parsing
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    # CORS (vLLM's --allowed-origins etc.): no origins, no CORS headers at all
    allowed_origins: tuple[str, ...] | list[str] = ()
    allowed_methods: tuple[str, ...] | list[str] = ("*",)
    allowed_headers: tuple[str, ...] | list[str] = ("*",)
    generation_config: str = "auto"  # auto | vllm | a folder holding generation_config.json
    chat_template: str | None = None  # vLLM's --chat-template: a Jinja file that replaces the model's
    tool_call_parser: str = "hermes"  # vLLM's names: how `tool_choice: auto` output is read (server/tool_parsers.py)
    chat_template_text: str | None = field(default=None, init=False)

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
        if self.max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be >= 1, got {self.max_prompts_per_request}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        names = self.served_model_name
        self.served_model_name = (names,) if isinstance(names, str) else tuple(names or ()) or None
        if self.served_model_name is not None and not all(self.served_model_name):
            raise ValueError(f"served_model_name must not be empty, got {list(self.served_model_name)}")
        self.allowed_origins = tuple(self.allowed_origins)
        self.allowed_methods = tuple(self.allowed_methods)
        self.allowed_headers = tuple(self.allowed_headers)
        if not self.generation_config:
            raise ValueError("generation_config must be auto, vllm or a folder, got ''")
        from headwise.server.tool_parsers import FORMATS

        if self.tool_call_parser not in FORMATS:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(sorted(FORMATS))}, got {self.tool_call_parser!r}"
            )
        if self.chat_template is not None:
            path = Path(self.chat_template)
            if not path.is_file():
                raise ValueError(f"chat_template: no such file {self.chat_template!r}")
            self.chat_template_text = path.read_text()
