"""The second hardening round (issue 25), the server's options through HTTP against a live
server on the tiny model (tests/round2_server.py): CORS, generation-config defaults,
continue_final_message, several served model names, the listening socket after SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.generation_defaults import GenerationConfigError, load_generation_defaults
from headwise.server.settings import ServerSettings
from tests.round2_server import (
    AUTH,
    CHAT,
    COMPLETIONS,
    DEFAULT_MAX_NEW_TOKENS,
    NAMES,
    ORIGIN,
    error_of,
    post,
    serve,
    write_model,
)
from tests.test_server_lifecycle import Stream, start_serve, stop
from tests.tiny_model import VOCAB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    yield from serve(tiny, tmp_path_factory)


# -- CORS ------------------------------------------------------------------------------
def test_a_cors_preflight_from_an_allowed_origin_is_answered_without_the_key(server):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = httpx.options(server.url + CHAT, headers=headers)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    simple = post(server, COMPLETIONS, {"prompt": "w1", "max_tokens": 1}, {**AUTH, "Origin": ORIGIN})
    assert simple.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_an_origin_not_allowed_gets_no_cors_headers(server):
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(server.url + CHAT, headers=headers)
    assert response.status_code == 400
    assert "Access-Control-Allow-Origin" not in response.headers


def test_without_allowed_origins_there_is_no_cors(tiny):
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(EngineConfig(model=tiny, kv_cache_mb=4))) as s:
        response = httpx.options(s.url + CHAT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert response.status_code == 405 and "Access-Control-Allow-Origin" not in response.headers


# -- model defaults, prefill, names -----------------------------------------------------
def test_generation_config_defaults_apply_under_the_request_values(server):
    user = [{"role": "user", "content": "w1 w2"}]
    unset = post(server, CHAT, {"messages": user, "ignore_eos": True}).json()
    assert unset["usage"]["completion_tokens"] == DEFAULT_MAX_NEW_TOKENS
    assert unset["choices"][0]["finish_reason"] == "length"
    explicit = post(server, CHAT, {"messages": user, "ignore_eos": True, "max_tokens": 5}).json()
    assert explicit["usage"]["completion_tokens"] == 5


def test_generation_config_sources(tmp_path):
    assert load_generation_defaults("vllm", tmp_path) == {}
    assert load_generation_defaults("auto", tmp_path) == {}  # the model has none
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 50, "do_sample": True, "max_new_tokens": 7})
    )
    expected = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_tokens": 7}
    assert load_generation_defaults("auto", tmp_path) == expected
    assert load_generation_defaults(str(tmp_path), None) == expected
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(GenerationConfigError, match="temperature must be >= 0, got -1"):
        load_generation_defaults("auto", tmp_path)
    with pytest.raises(GenerationConfigError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path / "missing"), None)


def _template_ids(server, messages, **flags) -> list[int]:
    response = post(server, "/tokenize", {"messages": messages, **flags})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_continue_final_message_leaves_the_assistant_turn_open(server):
    prefill = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w5 w6"}]
    closed = _template_ids(server, prefill, add_generation_prompt=False)
    opened = _template_ids(server, prefill, add_generation_prompt=False, continue_final_message=True)
    eos = VOCAB - 1
    assert closed == opened + [eos]  # the same prompt minus the end of the assistant's turn
    assert opened[-2:] == [5, 6]
    body = {"messages": prefill, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 2}
    assert post(server, CHAT, body).status_code == 200
    error = error_of(post(server, CHAT, {**body, "add_generation_prompt": True}), 400)
    assert error["param"] == "continue_final_message"


def test_every_served_model_name_is_accepted_and_responses_carry_the_first(server):
    listed = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]
    assert [card["id"] for card in listed] == list(NAMES)
    for name in NAMES:
        response = post(server, COMPLETIONS, {"model": name, "prompt": "w1", "max_tokens": 1})
        assert response.json()["model"] == NAMES[0]
        assert httpx.get(server.url + f"/v1/models/{name}", headers=AUTH).json()["id"] == name
    assert error_of(post(server, COMPLETIONS, {"model": "tiny-c", "prompt": "w1"}), 404)["param"] == "model"


# -- drain -----------------------------------------------------------------------------
REFUSED_WINDOW_S = 1.0  # from the first refused probe to the exit: interpreter teardown only


def test_the_listening_socket_answers_until_exit_after_sigterm(tiny):
    proc, url = start_serve(tiny, "--drain-timeout", "1")
    try:
        stream = Stream(url, {"prompt": "w1 w2", "max_tokens": 1500, "ignore_eos": True})
        stream.start()
        assert stream.started.wait(120)
        proc.send_signal(signal.SIGTERM)
        answers: list[tuple[float, int | None]] = []
        while proc.poll() is None:
            try:
                status = httpx.get(url + "/health", timeout=1.0, headers={"Connection": "close"}).status_code
            except httpx.HTTPError:
                status = None
            answers.append((time.monotonic(), status))
        exited = time.monotonic()
        assert proc.returncode == 0
        statuses = [status for _, status in answers]
        assert statuses.count(503) >= 5, statuses  # draining, answered, through the whole drain
        refused = [t for t, status in answers if status is None]
        window = exited - refused[0] if refused else 0.0
        print(f"drain: {statuses.count(503)} probes answered 503, refused for the last {window:.3f} s before exit")
        assert window < REFUSED_WINDOW_S, (window, statuses[-10:])
        stream.join(timeout=10)
        assert stream.events[-1] == "[DONE]" and stream.last_payload()["choices"][0]["finish_reason"] == "abort"
    finally:
        stop(proc)
