"""Errors a request or a model load can raise; the server maps them to HTTP codes."""

from __future__ import annotations

from headwise.engine.sampling_params import InvalidRequest


class UnknownPlan(InvalidRequest):
    """The request names a plan that is not loaded (HTTP 404)."""


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens exceed the model's context (HTTP 400)."""


class RequestFailed(RuntimeError):
    """The engine failed one request while running it (finish_reason "error"); the engine
    itself goes on (HTTP 500 for that request only)."""

    def __init__(self, request_id: str, error: str):
        super().__init__(f"request {request_id} failed in the engine: {error}")
        self.request_id = request_id
        self.error = error


class ModelLoadError(RuntimeError):
    """The model cannot be loaded: unsupported architecture, broken or missing file."""
