"""`--dtype auto`: bfloat16 where the matrix units multiply it natively, float32 elsewhere."""

from __future__ import annotations

import pytest

from headwise.engine import config
from headwise.engine.config import EngineConfig


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_the_cpu_follows_its_bf16_matmul_support(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(config, "cpu_has_bf16_matmul", lambda: has_bf16)
    assert EngineConfig(dtype="auto").dtype == expected


def test_auto_on_a_gpu_is_bfloat16(monkeypatch):
    monkeypatch.setattr(config, "cpu_has_bf16_matmul", lambda: False)
    assert EngineConfig(dtype="auto", device="cuda:0").dtype == "bfloat16"


def test_an_explicit_dtype_is_kept():
    assert EngineConfig(dtype="float32").dtype == "float32"


def test_an_unknown_dtype_names_itself_and_the_choices():
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported; choose one of auto, float32"):
        EngineConfig(dtype="int8")


def test_cli_dtype_auto_is_resolved_into_args():
    import argparse

    from headwise.clients.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--dtype", "auto", "--no-shipped-plans"])
    cfg = engine_config_from_args(args)
    assert args.dtype == cfg.dtype == config.auto_dtype("cpu")
