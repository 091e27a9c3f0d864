"""Serving under stress: disconnects free KV, concurrent streams stay correct, a full queue
answers 429, /health reports loading (SIGTERM: test_server_lifecycle.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings

MODEL = "smollm2-135m"
MAX_QUEUE = 60


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(model=MODEL, kv_cache_mb=64, max_num_seqs=64)
    with BackgroundServer(ServerSettings(port=0, max_queue=MAX_QUEUE), lambda: LLMEngine(config)) as running:
        yield running


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def all_blocks_free(server) -> bool:
    stats = server.state.engine.stats()
    return stats.num_free_blocks == stats.num_blocks and server.state.async_engine.num_unfinished == 0


def test_disconnect_mid_stream_frees_the_requests_blocks(server):
    body = {"prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        next(lines)
        request_id = first["id"] + "-0"
        assert server.state.engine.kv_blocks_in_use(request_id) > 0
    assert wait_until(lambda: server.state.engine.kv_blocks_in_use(request_id) == 0)
    assert wait_until(lambda: all_blocks_free(server))


def test_disconnect_of_a_blocking_request_frees_its_blocks(server):
    body = {"prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    assert wait_until(lambda: all_blocks_free(server))


def test_fifty_concurrent_streams_match_their_sequential_greedy_outputs(server):
    prompts = ["The capital of France is", "Water boils at", "My favourite colour is", "1, 2, 3,", "The cat sat on the"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    expected = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts
    ]

    async def stream(prompt: str) -> str:
        chunks = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def run_all() -> list[str]:
        return await asyncio.gather(*(stream(prompts[i % len(prompts)]) for i in range(50)))

    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    texts = asyncio.run(run_all())
    assert texts == [expected[i % len(prompts)] for i in range(50)]
    assert wait_until(lambda: all_blocks_free(server))


def test_requests_past_max_queue_get_429_not_a_hang(server):
    async def run_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(MAX_QUEUE + 20)))

    started = time.monotonic()
    statuses = [r.status_code for r in asyncio.run(run_all())]
    assert statuses.count(429) >= 20 and statuses.count(200) + statuses.count(429) == len(statuses)
    assert time.monotonic() - started < 120
    rejected = next(r for r in asyncio.run(run_all()) if r.status_code == 429).json()["error"]
    assert (rejected["type"], rejected["code"]) == ("rate_limit_error", "queue_full")
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_health_is_503_while_the_model_loads():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        raise RuntimeError("no model in this test")

    with BackgroundServer(ServerSettings(port=0), slow_load, wait_ready=False) as loading:
        health = httpx.get(loading.url + "/health")
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        error = httpx.post(loading.url + "/v1/completions", json={"prompt": "hi"}).json()["error"]
        assert error["code"] == "model_loading"
        release.set()
        assert wait_until(lambda: httpx.get(loading.url + "/health").json()["status"] == "error")
