"""What kernels.ops runs, decided once: HEADWISE_KERNELS and HEADWISE_DEBUG are read at
import, CPU tensors take the torch references, and the model's rotary table stays fp32
whatever dtype the model is cast to."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from headwise.engine.model import LlamaModel
from headwise.kernels import debug, ops, reference


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)


@pytest.mark.parametrize("value,checks", [("1", "True"), ("0", "False")])
def test_debug_checks_follow_headwise_debug_read_at_import(value, checks):
    proc = _python("from headwise.kernels import debug; print(debug.CHECKS)", HEADWISE_DEBUG=value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == checks
    assert debug.CHECKS, "the test suite runs with the checks on (tests/conftest.py)"


def test_unknown_forced_backend_fails_at_import_naming_it():
    proc = _python("import headwise.kernels.ops", HEADWISE_KERNELS="cuda")
    assert proc.returncode != 0
    assert "HEADWISE_KERNELS='cuda': expected one of reference, triton" in proc.stderr


def test_cpu_tensors_run_the_reference_model_ops():
    gen = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen), torch.rand(64, generator=gen)
    assert ops.backend_for(x) is reference
    assert torch.equal(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    y, s = ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r) and torch.equal(y, reference.rms_norm(x + r, w, 1e-6))


def test_rotary_table_stays_fp32_through_a_bf16_cast_and_holds_the_per_step_angles(engine):
    cfg = dataclasses.replace(engine.model_config, num_layers=1)
    model = LlamaModel(cfg).to(dtype=torch.bfloat16)
    assert model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    table = model.rotary.cos_sin
    assert table.dtype == torch.float32 and table.shape == (2, cfg.max_position_embeddings, cfg.head_dim // 2)
    positions = torch.tensor([0, 1, 17, 4095, cfg.max_position_embeddings - 1])
    cos, sin = model.rotary.cos_sin_at(positions)
    angles = positions.float()[:, None] * engine.model.rotary._inv_freq32[None, :]  # what each layer computed
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
