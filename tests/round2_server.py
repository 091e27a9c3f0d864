"""The live server on the tiny model that the second hardening round's HTTP tests share
(tests/test_server_round2.py, tests/test_server_round2_options.py): its key, origins, served
names, queue and timeouts, a --generation-config folder, and request helpers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings
from tests.tiny_model import write_tiny_llama

KEY = "sk-round2"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
NAMES = ("tiny-a", "tiny-b")
MAX_QUEUE = 4
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
DEFAULT_MAX_NEW_TOKENS = 3  # the module's --generation-config folder
# an end-of-turn marker after each message, so that leaving the last one open is visible
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def write_model(tmp_path_factory) -> str:
    """The tiny model with TEMPLATE as its chat template (each test module's `tiny` fixture)."""
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    (Path(model_dir) / "chat_template.jinja").write_text(TEMPLATE)
    return model_dir


def serve(tiny: str, tmp_path_factory):
    """The running server on `tiny`, for a module-scoped fixture to yield from."""
    defaults = tmp_path_factory.mktemp("genconfig")
    (defaults / "generation_config.json").write_text(json.dumps({"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}))
    config = EngineConfig(model=tiny, kv_cache_mb=8, max_model_len=64)
    settings = ServerSettings(
        port=0,
        api_key=KEY,
        max_queue=MAX_QUEUE,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        allowed_origins=(ORIGIN,),
        served_model_name=NAMES,
        generation_config=str(defaults),
    )
    with BackgroundServer(settings, lambda: LLMEngine(config)) as running:
        yield running


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH if headers is None else headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"]
    return error


def text_of(server, **knobs) -> str:
    body = {"prompt": "w1 w2 w3", "max_tokens": 6, "ignore_eos": True, **knobs}
    response = post(server, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]
