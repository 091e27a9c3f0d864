"""A short, bounded headless locust run against a live server: no failures, TTFT recorded."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"


def test_headless_locust_run_records_ttft_without_failures(tmp_path):
    config = EngineConfig(model="smollm2-135m", kv_cache_mb=32)
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as server:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(LOCUSTFILE),
                "--headless",
                "-u",
                "4",
                "-r",
                "4",
                "-t",
                "8s",
                "--host",
                server.url,
                "--scenario",
                "short",
                "--prompt-words",
                "16",
                "--max-tokens",
                "4",
                "--only-summary",
                "--csv",
                str(tmp_path / "run"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert int(rows[("TTFT", path)]["Request Count"]) > 0
        assert int(rows[("POST", path)]["Failure Count"]) == 0
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
