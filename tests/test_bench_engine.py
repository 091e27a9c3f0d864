"""`headwise bench latency` and `bench offline --baseline hf` on the tiny random Llama,
and the engine's opt-in per-phase step timings they rest on."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from headwise.clients.cli import main
from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams
from headwise.engine.step_timer import PHASES
from tests.tiny_model import random_prompts, write_tiny_llama

STATS = {"mean", "p50", "p90"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(write_tiny_llama(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def config_only_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model's config and tokenizer without its weights: only `dummy` can load it."""
    d = tmp_path_factory.mktemp("config-only")
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d)
    return d


def test_step_timings_are_recorded_only_when_asked(tiny_dir):
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), kv_cache_mb=8))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    eng.add_request("a", random_prompts(1, 20)[0], params)
    eng.step()
    assert eng.step_timings == {}
    eng.record_step_timings = True
    t = time.perf_counter()
    eng.step()
    wall = time.perf_counter() - t
    assert list(eng.step_timings) == list(PHASES)
    assert all(v >= 0 for v in eng.step_timings.values())
    assert min(eng.step_timings[p] for p in ("schedule", "prepare", "forward", "sample")) > 0
    # the phases tile the step: together they are its wall time, less the timer's own start
    assert sum(eng.step_timings.values()) == pytest.approx(wall, rel=0.05, abs=2e-3)


def test_bench_latency_prints_and_writes_every_figure(tiny_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    rc = main(
        [
            "bench",
            "latency",
            "--model",
            str(tiny_dir),
            "--batch-size",
            "2",
            "--input-len",
            "12",
            "--output-len",
            "4",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "2",
            "--kv-cache-mb",
            "8",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == (
        f"bench latency: {tiny_dir.name} on cpu (float32, auto weights), batch 2 x 12 tokens in, "
        "4 out; 2 measured iterations after 1 warm-up"
    )
    assert lines[1].split() == ["mean", "p50", "p90"]
    assert [line[:20].strip() for line in lines[2:7]] == [
        "latency s",
        "prefill s",
        "decode ms/step",
        "decode tok/s",
        "output tok/s",
    ]
    assert lines[7].startswith("one decode step, mean of 3 recorded steps")
    assert [line.split()[0] for line in lines[8:13]] == list(PHASES)
    assert lines[13].startswith("latency: ") and len(lines) == 14
    r = json.loads(out.read_text())
    assert set(r) == {
        "model",
        "device",
        "dtype",
        "load_format",
        "batch_size",
        "input_len",
        "output_len",
        "num_iters_warmup",
        "num_iters",
        "latency_s",
        "prefill_s",
        "decode_ms_per_step",
        "decode_tok_s",
        "output_tok_s",
        "peak_num_running",
        "step_breakdown_ms",
        "step_breakdown_steps",
        "iterations",
    }
    for key in ("latency_s", "prefill_s", "decode_ms_per_step", "decode_tok_s", "output_tok_s"):
        assert set(r[key]) == STATS and r[key]["mean"] > 0
    assert len(r["iterations"]) == 2 and r["peak_num_running"] == 2 and r["step_breakdown_steps"] == 3
    assert set(r["step_breakdown_ms"]) == set(PHASES) | {"total"}
    it = r["iterations"][0]
    # 2 x 4 tokens over the whole iteration; 2 tokens per decode step
    assert it["output_tok_s"] == pytest.approx(8 / it["latency_s"])
    assert it["decode_tok_s"] == pytest.approx(2000 / it["decode_ms_per_step"])
    assert it["latency_s"] > it["prefill_s"] > 0


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--output-len", "1"], "--output-len must be >= 2, got 1"),
        (["--batch-size", "4", "--max-num-seqs", "2"], "--batch-size 4 exceeds --max-num-seqs 2"),
    ],
)
def test_bench_latency_refuses_what_it_cannot_measure(tiny_dir, capsys, flags, error):
    assert main(["bench", "latency", "--model", str(tiny_dir), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"headwise bench: error: {error}")


def test_bench_offline_hf_baseline_runs_dummy_weights_on_the_engines_device_and_dtype(config_only_dir, capsys):
    rc = main(
        [
            "bench",
            "offline",
            "--model",
            str(config_only_dir),
            "--load-format",
            "dummy",
            "--dtype",
            "bfloat16",
            "--num-prompts",
            "3",
            "--input-len",
            "8-16",
            "--output-len",
            "3",
            "--max-num-seqs",
            "2",
            "--kv-cache-mb",
            "8",
            "--baseline",
            "hf",
            "--json",
        ]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["device"] == "cpu" and r["hf_device"] == "cpu"
    assert r["dtype"] == r["hf_dtype"] == "bfloat16" and r["load_format"] == "dummy"
    assert r["peak_num_running"] == 2  # --max-num-seqs caps the engine's batch
    assert r["num_prompts"] == 3 and r["hf_batch_size"] == 2 and r["hf_tok_s"] > 0 and r["engine_tok_s"] > 0
