"""Shared fixtures: engines over the default model (weights loaded once per process).

The suite runs with HEADWISE_DEBUG=1 (read once when headwise.kernels.debug is imported,
so it is set before any headwise import): every kernel op checks its inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HEADWISE_DEBUG", "1")

# `make test` runs two pytest-xdist workers on the two cores: each worker (and every process a
# test starts, which inherits the variable) computes on one thread, so the two do not fight
# over the cores. A plain `pytest` run keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without a GPU the Triton tests run the interpreter, and triton reads TRITON_INTERPRET when a
# kernel is decorated: set it before any test module (or headwise) imports triton, so those
# tests never depend on which module was collected first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
