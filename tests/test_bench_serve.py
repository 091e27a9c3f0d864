"""`headwise bench serve`: the statistics it prints, and a short run against a live server."""

from __future__ import annotations

import json

import pytest

from headwise.clients.bench.serve import RequestResult, format_report, summarize
from headwise.clients.cli import main
from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings


def test_summary_follows_benchmark_serving_definitions():
    results = [
        RequestResult(ok=True, ttft=0.1, latency=0.5, itl=[0.1, 0.2], prompt_tokens=10, output_tokens=5),
        RequestResult(ok=True, ttft=0.3, latency=0.7, itl=[0.2], prompt_tokens=10, output_tokens=3),
        RequestResult(error="HTTP 429: full", prompt_tokens=10),
    ]
    s = summarize(results, duration=2.0, peaks={"num_requests_running": 2, "kv_cache_usage_perc": 0.25}, config={})
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 429: full"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (20, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0 and s["total_token_throughput"] == 14.0
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT excludes the first token: (0.5 - 0.1) / 4 and (0.7 - 0.3) / 2
    assert s["mean_tpot_ms"] == pytest.approx((100.0 + 200.0) / 2)
    assert s["mean_itl_ms"] == pytest.approx(500.0 / 3)
    assert s["p99_e2el_ms"] == pytest.approx(698.0)
    report = format_report(s)
    for line in (
        "Successful requests:",
        "Request throughput (req/s):",
        "Mean TTFT (ms):",
        "P99 ITL (ms):",
        "Median E2EL (ms):",
        "Max concurrency observed:",
    ):
        assert line in report
    assert report.splitlines()[-1].startswith("bench serve: 2 requests")


def test_bench_serve_against_a_live_server(tmp_path, capsys):
    config = EngineConfig(model="smollm2-135m", kv_cache_mb=32)
    out = tmp_path / "result.json"
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as server:
        status = main(
            [
                "bench",
                "serve",
                "--url",
                server.url,
                "--num-prompts",
                "6",
                "--concurrency",
                "3",
                "--input-len",
                "32",
                "--output-len",
                "8",
                "--kv-plan",
                "full",
                "--result-json",
                str(out),
            ]
        )
    assert status == 0
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (6, 0)
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (6 * 32, 6 * 8)
    assert 1 <= result["max_concurrency_observed"] <= 3
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert "Serving Benchmark Result" in capsys.readouterr().out
