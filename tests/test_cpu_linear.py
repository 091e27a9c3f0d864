"""oneDNN-packed CPU matmuls (engine/cpu_linear.py): the packed copy multiplies what the plain
weight does, serves only its row range, and the model packs its projections and lm_head once,
within the byte cap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from headwise.engine import model as model_module
from headwise.engine.cpu_linear import COLUMNS_ROWS, PACKED_ROWS, PackedWeight, can_pack
from headwise.engine.loader import read_config
from headwise.engine.model import Linear
from headwise.engine.weights import materialize
from tests.tiny_model import write_tiny_llama

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(2, 2)), reason="torch built without oneDNN")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 2, 8, 33, 512])
def test_packed_weight_multiplies_as_the_plain_weight(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 80, generator=g) * 0.1).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)
    packed = PackedWeight.of(w, (1, 1 << 20))
    want = F.linear(x.double(), w.double(), bias.double())
    got = packed.linear(x, bias)
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 32])
def test_column_blocks_multiply_as_the_plain_weight(rows):
    """fp32 weights whose output size is a multiple of 32 take cpu_ops' column blocks for 1-32
    rows (tiles of 8 rows and every remainder), bias included; others keep oneDNN's layout."""
    g = torch.Generator().manual_seed(rows)
    w, bias = torch.randn(96, 80, generator=g) * 0.1, torch.randn(96, generator=g)
    x = torch.randn(rows, 80, generator=g)
    packed = PackedWeight.of(w)
    assert packed.columns and (packed.lo, packed.hi) == COLUMNS_ROWS
    with torch.inference_mode():
        assert packed.serves(x)
        torch.testing.assert_close(packed.linear(x, bias), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.linear(x, None), F.linear(x, w), atol=1e-5, rtol=1e-5)
    odd = PackedWeight.of(torch.randn(40, 80, generator=g))
    assert not odd.columns and (odd.lo, odd.hi) == PACKED_ROWS[torch.float32]
    assert not PackedWeight.of(w.bfloat16()).columns


def test_linear_takes_the_packed_copy_only_for_its_rows():
    lo, hi = PACKED_ROWS[torch.float32]
    lin = Linear(16, 8, bias=False)
    lin.packed = PackedWeight.of(lin.weight.detach())
    calls = []
    real = lin.packed.linear

    def spy(x, bias):
        calls.append(x.shape[0])
        return real(x, bias)

    object.__setattr__(lin.packed, "linear", spy)
    with torch.inference_mode():
        for rows in (lo - 1, lo, hi, hi + 1):
            if rows > 0:
                torch.testing.assert_close(lin(torch.ones(rows, 16)), F.linear(torch.ones(rows, 16), lin.weight))
        assert lin.packed.serves(torch.ones(lo, 16)) and not lin.packed.serves(torch.ones(2, lo, 16))
    assert calls == [lo, hi]
    # with gradients on (the duo profiler backpropagates), the plain weight serves every row count
    assert not lin.packed.serves(torch.ones(lo, 16))


def test_packed_model_backpropagates_a_short_input(tiny_dir):
    """A packed model still gives gradients for inputs within the packed row range (duo's
    profiler trains gates through the model, prompts of 32 tokens or fewer included)."""
    model = materialize(read_config(tiny_dir), tiny_dir, torch.float32, "cpu")
    lin = next(m for m in model.layers.modules() if isinstance(m, Linear))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, lin.in_features, generator=g)
    x_plain = x.clone().requires_grad_(True)
    lin(x_plain).square().sum().backward()
    model.pack_linears()
    x_packed = x.clone().requires_grad_(True)
    out = lin(x_packed)
    assert out.requires_grad
    out.square().sum().backward()
    torch.testing.assert_close(x_packed.grad, x_plain.grad, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return Path(write_tiny_llama(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_packs_every_projection_and_lm_head_once(tiny_dir, dtype):
    model = materialize(read_config(tiny_dir), tiny_dir, dtype, "cpu")
    linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
    x = torch.randn(8, model.cfg.hidden_size).to(dtype)
    takes_x = [m for m in linears if m.in_features == x.shape[1]]
    before = [m(x) for m in takes_x], model.logits(x)
    model.pack_linears()
    model.copy_lm_head_column_major()
    assert all(m.packed is not None for m in linears)
    first = linears[0].packed
    model.pack_linears()
    assert linears[0].packed is first
    # the packed lm_head serves one row too (fp32 column blocks, bf16 oneDNN), so no column-major copy
    assert model._lm_head_packed is not None and model._lm_head_packed.lo == 1
    assert model._lm_head_column_major is None
    assert all(m.packed.columns == (dtype == torch.float32) for m in linears if m.out_features % 32 == 0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.inference_mode():  # the packed copies serve only where no gradient is wanted
        for a, m in zip(before[0], takes_x):
            torch.testing.assert_close(m(x).float(), a.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(model.logits(x), before[1], atol=tol * 20, rtol=tol)
        torch.testing.assert_close(model.logits(x[:1]), before[1][:1], atol=tol * 20, rtol=tol)


def test_model_over_the_byte_cap_packs_nothing(tiny_dir, monkeypatch):
    monkeypatch.setattr(model_module, "PACKED_COPY_MAX_BYTES", 1024)
    model = materialize(read_config(tiny_dir), tiny_dir, torch.float32, "cpu")
    model.pack_linears()
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    assert model._lm_head_packed is None
