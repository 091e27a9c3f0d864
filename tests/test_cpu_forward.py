"""The CPU forward's layouts and shortcuts compute what the plain formulas do: column-major
layer weights holding the checkpoint's values, the three logits paths (column-major copy,
`W h^T`, `h W^T`), and the decode attention of full heads, which skips the slot positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headwise.engine.loader import read_config
from headwise.engine.model import LM_HEAD_COLUMN_MAJOR_ROWS, LM_HEAD_TRANSPOSED_ROWS, Linear
from headwise.engine.weights import materialize
from headwise.kernels import reference as ref
from headwise.kernels.layout import UNBOUNDED
from tests.tiny_model import write_tiny_llama

TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32 kernels against float64 formulas


@pytest.fixture(scope="module")
def tiny_cpu_model(tmp_path_factory):
    d = Path(write_tiny_llama(tmp_path_factory.mktemp("tiny")))
    return d, materialize(read_config(d), d, torch.float32, "cpu")


def test_cpu_layer_weights_are_column_major_with_the_checkpoint_values(tiny_cpu_model):
    from safetensors.torch import load_file

    d, model = tiny_cpu_model
    state = load_file(str(d / "model.safetensors"))
    linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * len(model.layers)
    for m in linears:
        out, inp = m.weight.shape
        assert m.weight.stride() == (1, out)
    attn = model.layers[1].self_attn
    q_rows = attn.hq * attn.d
    assert torch.equal(attn.qkv_proj.weight[:q_rows], state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(model.layers[2].mlp.down_proj.weight, state["model.layers.2.mlp.down_proj.weight"])
    assert model.lm_head.weight.is_contiguous()  # row-major: the embedding when tied


@pytest.mark.parametrize(
    "rows", [1, LM_HEAD_COLUMN_MAJOR_ROWS, 5, LM_HEAD_TRANSPOSED_ROWS, LM_HEAD_TRANSPOSED_ROWS + 1]
)
def test_every_logits_path_equals_the_plain_product(tiny_cpu_model, rows):
    _, model = tiny_cpu_model
    model.copy_lm_head_column_major()
    hidden = torch.randn(rows, model.cfg.hidden_size, generator=torch.Generator().manual_seed(rows))
    logits = model.logits(hidden)
    expected = hidden.double() @ model.lm_head.weight.double().T
    assert logits.shape == (rows, model.cfg.vocab_size) and logits.dtype == torch.float32 and logits.is_contiguous()
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-5)


def test_full_head_decode_ignores_slot_positions_and_equals_the_masked_path():
    """Full heads (every window reaches position 0) take the path that never reads the slot
    positions: garbage there changes nothing, and the output equals the general masked path
    (all slots kept through `keep`, a window that would hide every position): bit for bit
    before the C++ op of kernels/cpu_ops.py took the fast path, to fp32 rounding now.
    A sequence whose heads hold nothing gets output 0 and lse -inf on both paths."""
    gen = torch.Generator().manual_seed(0)
    bs, d, hkv, g = 4, 16, 2, 3
    k_cache = torch.randn(12, bs, d, generator=gen)
    v_cache = torch.randn(12, bs, d, generator=gen)
    tables = torch.randperm(12, generator=gen).view(3, hkv, 2).int()
    lengths = torch.tensor([[7, 5], [8, 8], [0, 0]], dtype=torch.int32)
    q = torch.randn(3, hkv * g, d, generator=gen)
    q_pos = torch.tensor([9, 8, 0], dtype=torch.int32)
    rows = torch.arange(3, dtype=torch.int32)

    def decode(pos_cache, keep, recent):
        return ref.paged_decode(q, k_cache, v_cache, pos_cache, tables, rows, lengths, keep, recent, q_pos, 0.25)

    zero = torch.zeros_like(lengths)
    garbage = torch.full((12, bs), -7, dtype=torch.int32)
    fast_out, fast_lse = decode(garbage, zero, zero + UNBOUNDED)
    assert all(torch.equal(a, b) for a, b in zip((fast_out, fast_lse), decode(garbage * 0, zero, zero + UNBOUNDED)))
    masked_out, masked_lse = decode(torch.zeros(12, bs, dtype=torch.int32), lengths, zero + 1)
    torch.testing.assert_close(fast_out, masked_out, **TOL)
    torch.testing.assert_close(fast_lse, masked_lse, **TOL)
    for s in range(2):
        for h in range(hkv):
            n = int(lengths[s, h])
            ids = tables[s, h].long()
            k = k_cache[ids].reshape(-1, d)[:n].double()
            v = v_cache[ids].reshape(-1, d)[:n].double()
            scores = q[s, h * g : (h + 1) * g].double() @ k.T * 0.25
            torch.testing.assert_close(fast_out[s, h * g : (h + 1) * g].double(), scores.softmax(-1) @ v, **TOL)
            torch.testing.assert_close(fast_lse[s, h * g : (h + 1) * g].double(), scores.logsumexp(-1), **TOL)
    assert torch.all(fast_out[2] == 0) and torch.all(fast_lse[2] == float("-inf"))
