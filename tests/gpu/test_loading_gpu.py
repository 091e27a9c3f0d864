"""Weights straight to CUDA: a streamed checkpoint on the GPU equals the CPU load converted,
the GPU never holds more than the weights plus one checkpoint tensor while loading, dummy
weights are drawn on the GPU; `bench latency` and `bench offline --baseline hf` run there
(transformers on the same GPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from headwise.clients.cli import main  # noqa: E402
from headwise.engine.loader import read_config  # noqa: E402
from headwise.engine.weights import materialize  # noqa: E402
from tests.tiny_model import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return Path(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_cuda_weights_equal_the_cpu_load(model_dir, dtype):
    cfg = read_config(model_dir)
    cpu = materialize(cfg, model_dir, dtype, "cpu")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gpu = materialize(cfg, model_dir, dtype, "cuda")
    torch.cuda.synchronize()
    # the parameters and the fp32 RoPE table (cos / sin of every position, built on the device)
    weights = sum(t.numel() * t.element_size() for t in (*gpu.parameters(), *gpu.buffers()))
    largest = max(p.numel() * 4 for p in cpu.parameters())  # the checkpoint is fp32
    assert torch.cuda.memory_allocated() - base == pytest.approx(weights, rel=0.01)
    # no fp32 copy of the model, no concatenated q/k/v: at most one checkpoint tensor in flight
    assert torch.cuda.max_memory_allocated() - base <= weights + largest + 2**20
    got, want = gpu.state_dict(), cpu.state_dict()
    for name, tensor in want.items():
        assert got[name].device.type == "cuda" and got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].cpu(), tensor), name
    assert gpu.rotary.cos_sin.dtype == torch.float32 and gpu.rotary.cos_sin.device.type == "cuda"


def test_dummy_weights_are_drawn_on_the_gpu_in_bf16(model_dir, tmp_path):
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path)
    cfg = read_config(tmp_path)
    model = materialize(cfg, tmp_path, torch.bfloat16, "cuda", "dummy")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    again = materialize(cfg, tmp_path, torch.bfloat16, "cuda", "dummy")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    logits = model.logits(model.embed_tokens(torch.arange(8, device="cuda")))
    assert torch.isfinite(logits).all()


def test_bench_latency_on_cuda_records_every_phase(model_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    rc = main(
        [
            "bench",
            "latency",
            "--model",
            str(model_dir),
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--batch-size",
            "4",
            "--input-len",
            "64",
            "--output-len",
            "8",
            "--num-iters",
            "2",
            "--kv-cache-mb",
            "64",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cuda" and r["peak_num_running"] == 4 and r["step_breakdown_steps"] == 7
    assert r["step_breakdown_ms"]["prepare"] > 0 and r["step_breakdown_ms"]["forward"] > 0  # graphs replay too


def test_bench_offline_hf_baseline_runs_on_the_same_gpu(model_dir, capsys):
    rc = main(
        [
            "bench",
            "offline",
            "--model",
            str(model_dir),
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--load-format",
            "dummy",
            "--num-prompts",
            "4",
            "--input-len",
            "16-32",
            "--output-len",
            "4",
            "--kv-cache-mb",
            "64",
            "--baseline",
            "hf",
            "--json",
        ]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["device"] == "cuda" and r["hf_device"].startswith("cuda") and r["hf_dtype"] == "bfloat16"
    assert r["peak_num_running"] == 4
