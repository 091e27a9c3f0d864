"""Errors a request or a model load can raise; the server maps them to HTTP codes."""

from __future__ import annotations

from headwise.engine.sampling_params import InvalidRequest


class UnknownPlan(InvalidRequest):
    """The request names a plan that is not loaded (HTTP 404)."""


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens exceed the model's context (HTTP 400)."""


class ModelLoadError(RuntimeError):
    """The model cannot be loaded: unsupported architecture, broken or missing file."""
