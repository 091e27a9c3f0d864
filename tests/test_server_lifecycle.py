"""Faults and the server's end of life: a request that breaks inside the engine fails
alone (500, or an error event and [DONE]); SIGTERM drains (health 503 at once, streams
past --drain-timeout end with finish_reason "abort" and [DONE], exit 0); an engine fault
that no request can be blamed for fails what is in flight, turns /health to 503 and makes
`headwise serve` exit with status 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.detokenizer import Detokenizer
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings
from tests.tiny_model import write_tiny_llama

DRAIN_TIMEOUT = 2.0
POISON_TOKEN = 499  # a prompt starting with it makes the planted forward pass fail

# `headwise serve` with a forward pass that fails for one marked prompt: a stand-in for a
# CUDA fault, which no per-request guard can pin on a request
FAULTY_SERVE = f"""
import sys
from headwise.engine.model_runner import ModelRunner
real_execute = ModelRunner.execute
def execute(self, scheduled, *rest):
    if any(seq.prompt_token_ids[0] == {POISON_TOKEN} for seq, _ in scheduled):
        raise RuntimeError("planted: an illegal memory access was encountered")
    return real_execute(self, scheduled, *rest)
ModelRunner.execute = execute
from headwise.clients.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> tuple[int | None, dict | None]:
    try:
        response = httpx.get(url + "/health", timeout=2.0)
    except httpx.HTTPError:
        return None, None
    return response.status_code, response.json()


def start_serve(tiny: str, *flags: str, code: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["-c", code] if code else ["-m", "headwise.clients.cli"]
    proc = subprocess.Popen(
        [
            sys.executable,
            *command,
            "serve",
            "--model",
            tiny,
            "--port",
            str(port),
            "--kv-cache-mb",
            "16",
            "--log-level",
            "warning",
            *flags,
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while health(url)[0] != 200:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)
    return proc, url


class Stream(threading.Thread):
    """One streamed completion; `events` holds every `data:` payload, `started` is set at
    the first one."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "stream": True}
        self.events: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except BaseException as e:  # a cut body shows up here
            self.error = e
        finally:
            self.started.set()

    def last_payload(self) -> dict:
        return json.loads(self.events[-2])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_finishes_short_streams_aborts_long_ones_and_exits_0(tiny):
    proc, url = start_serve(tiny, "--drain-timeout", str(DRAIN_TIMEOUT))
    try:
        short = Stream(url, {"prompt": "w1 w2", "max_tokens": 4, "ignore_eos": True})
        long = [Stream(url, {"prompt": f"w{i} w9", "max_tokens": 1500, "ignore_eos": True}) for i in range(3)]
        for stream in [*long, short]:
            stream.start()
        for stream in [*long, short]:
            assert stream.started.wait(120)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        seen = []
        while time.monotonic() - sent < 10.0 and (not seen or seen[-1][0] != 503):
            seen.append(health(url))
        assert seen[-1] == (503, {"status": "draining"}), seen
        assert proc.wait(timeout=DRAIN_TIMEOUT + 30) == 0
        for stream in [*long, short]:
            stream.join(timeout=10)
            assert stream.error is None and stream.events[-1] == "[DONE]"
        assert short.last_payload()["choices"][0]["finish_reason"] == "length"
        # cut at --drain-timeout: 1500 tokens would have ended with "length"
        assert [s.last_payload()["choices"][0]["finish_reason"] for s in long] == ["abort"] * 3
    finally:
        stop(proc)


def test_engine_death_fails_the_streams_in_flight_and_serve_exits_1(tiny):
    proc, url = start_serve(tiny, "--drain-timeout", "30", code=FAULTY_SERVE)
    try:
        stream = Stream(url, {"prompt": "w1 w2", "max_tokens": 1500, "ignore_eos": True})
        stream.start()
        assert stream.started.wait(120)
        poisoned = httpx.post(url + "/v1/completions", json={"prompt": [POISON_TOKEN, 1], "max_tokens": 2}, timeout=60)
        assert poisoned.status_code == 500
        assert poisoned.json()["error"]["code"] == "engine_dead"
        stream.join(timeout=60)
        assert stream.error is None and stream.events[-1] == "[DONE]"
        assert stream.last_payload()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=60) == 1
    finally:
        stop(proc)


def test_a_dead_engine_turns_health_to_503_and_refuses_new_requests(tiny, monkeypatch):
    config = EngineConfig(model=tiny, kv_cache_mb=8, max_model_len=64)
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as server:
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2})
        assert ok.status_code == 200

        def execute(scheduled, *rest):
            raise RuntimeError("planted: device lost")

        monkeypatch.setattr(server.state.engine.runner, "execute", execute)
        failed = httpx.post(server.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=60)
        assert (failed.status_code, failed.json()["error"]["code"]) == (500, "engine_dead")
        status, body = health(server.url)
        assert (status, body["status"]) == (503, "dead") and "device lost" in body["message"]
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2})
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "engine_dead")


def test_a_request_that_breaks_in_the_engine_gets_500_and_the_others_go_on(tiny, monkeypatch):
    real_update = Detokenizer.update

    def update(self, seq):
        # at the second token: the stream has begun, so it must end with an error event
        if seq.prompt_token_ids[0] == POISON_TOKEN and len(seq.output_token_ids) == 2:
            raise ValueError("planted: this request's detokenization breaks")
        return real_update(self, seq)

    monkeypatch.setattr(Detokenizer, "update", update)
    config = EngineConfig(model=tiny, kv_cache_mb=8, max_model_len=64)
    normal = {"prompt": "w1 w2 w3", "max_tokens": 6, "temperature": 0}
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as server:
        usual = httpx.post(server.url + "/v1/completions", json=normal).json()["choices"][0]["text"]
        beside = Stream(server.url, {"prompt": "w4 w5", "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        beside.start()
        assert beside.started.wait(60)
        broken = httpx.post(
            server.url + "/v1/completions", json={"prompt": [POISON_TOKEN, 1], "max_tokens": 4}, timeout=60
        )
        assert broken.status_code == 500
        error = broken.json()["error"]
        assert (error["code"], error["type"]) == ("request_failed", "server_error")
        assert "planted: this request's detokenization breaks" in error["message"]
        stream = Stream(server.url, {"prompt": [POISON_TOKEN, 2], "max_tokens": 4})
        stream.run()
        assert stream.error is None and stream.events[-1] == "[DONE]"
        assert json.loads(stream.events[0])["choices"][0]["text"]  # the first token went out
        assert stream.last_payload()["error"]["code"] == "request_failed"
        beside.join(timeout=60)
        assert beside.last_payload()["choices"][0]["finish_reason"] == "length"
        assert health(server.url) == (200, {"status": "ok"})
        assert httpx.post(server.url + "/v1/completions", json=normal).json()["choices"][0]["text"] == usual
        stats = server.state.engine.stats()
        assert stats.num_free_blocks == stats.num_blocks


def test_a_dead_tensor_parallel_worker_fails_requests_with_500_and_health_503(tiny):
    """Under --tensor-parallel-size 2 a worker process that dies mid-request is an engine
    fault: the requests in flight get the engine_dead error (500, or the error event and
    [DONE] in a stream) instead of hanging, /health turns 503 and new requests are refused."""
    config = EngineConfig(model=tiny, kv_cache_mb=8, tensor_parallel_size=2)
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as server:
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
        stream = Stream(server.url, {"prompt": "w1 w2", "max_tokens": 1500, "ignore_eos": True})
        stream.start()
        blocking: dict = {}

        def post() -> None:
            blocking["r"] = httpx.post(
                server.url + "/v1/completions",
                timeout=120,
                json={"prompt": "w3 w4", "max_tokens": 1500, "ignore_eos": True},
            )

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        assert stream.started.wait(120) and stream.error is None
        worker = server.state.engine.workers.processes[0]
        worker.kill()
        stream.join(timeout=60)
        poster.join(timeout=60)
        assert not stream.is_alive() and not poster.is_alive(), "a request hung on a dead worker"
        assert stream.events[-1] == "[DONE]"
        assert stream.last_payload()["error"]["code"] == "engine_dead"
        r = blocking["r"]
        assert (r.status_code, r.json()["error"]["code"]) == (500, "engine_dead")
        status, body = health(server.url)
        assert (status, body["status"]) == (503, "dead") and "worker rank 1" in body["message"]
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2})
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "engine_dead")
