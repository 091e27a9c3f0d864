"""The poison requests of issue 17, each against a live server (tiny model, API key set):
every one gets its exact 4xx with an OpenAI error object, the engine stays alive, and
normal requests, the next one and those streaming meanwhile, give exactly their usual
output."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings
from tests.tiny_model import add_chat_template, write_tiny_llama

KEY = "sk-poison"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
LIMIT = 64 * 1024  # --max-request-bytes: small, so an oversized body is cheap to send
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "w1 w2"}]
NORMAL = {"prompt": "w1 w2 w3 w4", "max_tokens": 8, "temperature": 0}
STREAM = {"prompt": "w5 w6 w7", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    add_chat_template(model_dir)
    config = EngineConfig(model=model_dir, kv_cache_mb=8, max_model_len=64)
    settings = ServerSettings(port=0, api_key=KEY, max_request_bytes=LIMIT)
    with BackgroundServer(settings, lambda: LLMEngine(config)) as running:
        yield running


def send(server, path: str, raw: bytes | object, headers: dict | None = None) -> httpx.Response:
    """POST `raw` as is (bytes, or an iterator for a chunked body); JSON-able values are
    encoded with ASCII escapes, so a lone surrogate travels as `\\ud800`."""
    content = raw if isinstance(raw, bytes) or hasattr(raw, "__next__") else json.dumps(raw).encode()
    return httpx.post(server.url + path, content=content, headers=AUTH if headers is None else headers, timeout=60)


def completion_text(server) -> str:
    response = send(server, COMPLETIONS, NORMAL)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def stream_text(server) -> str:
    text, events = "", []
    with httpx.stream("POST", server.url + COMPLETIONS, json=STREAM, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        text += json.loads(event)["choices"][0]["text"]
    return text


@pytest.fixture(scope="module")
def usual(server) -> dict[str, str]:
    return {"completion": completion_text(server), "stream": stream_text(server)}


def oversized_chunks():
    for _ in range(2 * LIMIT // 4096):
        yield b" " * 4096


POISON = [
    # (name, path, body, headers (None: with the key), status, param or code)
    ("seed 2**64", COMPLETIONS, {"prompt": "w1", "seed": 2**64}, None, 400, "seed"),
    ("seed 2**64 (chat)", CHAT, {"messages": USER, "seed": 2**64}, None, 400, "seed"),
    ("seed below -2**63", COMPLETIONS, {"prompt": "w1", "seed": -(2**63) - 1}, None, 400, "seed"),
    ("seed below -2**63 (chat)", CHAT, {"messages": USER, "seed": -(2**63) - 1}, None, 400, "seed"),
    ("token id 2**70", COMPLETIONS, {"prompt": [1153, 781100415592525383860224]}, None, 400, "prompt"),
    ("token id 2**63 in a batch", COMPLETIONS, {"prompt": [[1938], [9223372036854775808]]}, None, 400, "prompt"),
    ("token id past the vocabulary", COMPLETIONS, {"prompt": [1, 512]}, None, 400, "prompt"),
    ("lone surrogate in a prompt", COMPLETIONS, {"prompt": "x\ud800y"}, None, 400, "prompt"),
    ("lone surrogate in a model name", COMPLETIONS, {"prompt": "w1", "model": "gpt\udfff"}, None, 400, "model"),
    (
        "lone surrogate in a message",
        CHAT,
        {"messages": [{"role": "user", "content": "\udc00"}]},
        None,
        400,
        "messages.0.content",
    ),
    ("lone surrogate in stop", COMPLETIONS, {"prompt": "w1", "stop": ["\ud83d"]}, None, 400, "stop"),
    (
        "stop token past the vocabulary",
        COMPLETIONS,
        {"prompt": "Hello", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [1000000]},
        None,
        400,
        "stop_token_ids",
    ),
    ('stream "yes"', CHAT, {"messages": USER, "stream": "yes"}, None, 400, "stream"),
    ("temperature 100", COMPLETIONS, {"prompt": "w1", "temperature": 100}, None, 400, "temperature"),
    ("temperature Infinity", COMPLETIONS, b'{"prompt": "w1", "temperature": Infinity}', None, 400, "temperature"),
    ("top_p NaN", COMPLETIONS, b'{"prompt": "w1", "top_p": NaN}', None, 400, "top_p"),
    ("n as a string", COMPLETIONS, {"prompt": "w1", "n": "2"}, None, 400, "n"),
    ("detokenize 2**70", "/detokenize", {"tokens": [2**70]}, None, 400, "tokens"),
    (
        "invalid JSON without the key",
        CHAT,
        b'{"messages": [}',
        {"Content-Type": "application/json"},
        401,
        "invalid_api_key",
    ),
    ("invalid JSON with the key", CHAT, b'{"messages": [}', None, 400, "invalid_json"),
    ("oversized body", COMPLETIONS, json.dumps({"prompt": "w1 " * LIMIT}).encode(), None, 413, "request_too_large"),
    ("oversized chunked body", COMPLETIONS, "chunks", None, 413, "request_too_large"),
    (
        "oversized body without the key",
        COMPLETIONS,
        b"x" * 2 * LIMIT,
        {"Content-Type": "application/json"},
        401,
        "invalid_api_key",
    ),
]


@pytest.mark.parametrize("name, path, body, headers, status, expected", POISON, ids=[p[0] for p in POISON])
def test_poison_request_gets_its_4xx_and_the_next_request_is_unchanged(
    server, usual, name, path, body, headers, status, expected
):
    response = send(server, path, oversized_chunks() if body == "chunks" else body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert expected in (error["param"], error["code"])
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert completion_text(server) == usual["completion"]


def test_unknown_model_names_are_quoted_safely_in_the_404(server):
    for name in ("gpt-9", "a" * 500, "tab\there", "\u00e9t\u00e9"):
        error = send(server, COMPLETIONS, {"prompt": "w1", "model": name}).json()["error"]
        assert error["code"] == "model_not_found"
        assert len(error["message"]) < 250
    # a path segment that is not UTF-8 once percent-decoded
    response = httpx.get(server.url + "/v1/models/%ED%A0%80x", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_poison_barrage_leaves_concurrent_streams_unchanged(server, usual):
    results: list[str] = []
    streams = [threading.Thread(target=lambda: results.append(stream_text(server))) for _ in range(3)]
    for thread in streams:
        thread.start()
    statuses = [
        send(server, path, oversized_chunks() if body == "chunks" else body, headers).status_code
        for _, path, body, headers, _, _ in POISON
    ]
    for thread in streams:
        thread.join()
    assert statuses == [status for *_, status, _ in POISON]
    assert results == [usual["stream"]] * 3
    stats = server.state.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
