"""Shared fixtures: engines over the default model (weights loaded once per process)."""

from __future__ import annotations

import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine


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
