"""Shared fixtures: engines over the default model (weights loaded once per process).

The suite runs with HEADWISE_DEBUG=1 (read once when headwise.kernels.debug is imported,
so it is set before any headwise import): every kernel op checks its inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HEADWISE_DEBUG", "1")

import pytest  # noqa: E402

from headwise.engine.config import EngineConfig  # noqa: E402
from headwise.engine.llm_engine import LLMEngine  # noqa: E402


@pytest.fixture(scope="session")
def make_engine():
    """Build an LLMEngine on the default model; keyword arguments go to EngineConfig."""

    def make(**kw) -> LLMEngine:
        kw.setdefault("kv_cache_mb", 128)
        return LLMEngine(EngineConfig(**kw))

    return make


@pytest.fixture(scope="session")
def engine(make_engine) -> LLMEngine:
    return make_engine()


@pytest.fixture(scope="session")
def tok(engine):
    return engine.tokenizer
