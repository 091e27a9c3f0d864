"""Bad requests get the right status and an OpenAI error object, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings

MODEL = "smollm2-135m"
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    # a short context so that an over-long prompt is cheap to send
    config = EngineConfig(model=MODEL, kv_cache_mb=32, max_model_len=256)
    with BackgroundServer(ServerSettings(port=0, api_key=KEY), lambda: LLMEngine(config)) as running:
        yield running


def post(server, path: str, body=None, content: bytes | None = None, headers=AUTH) -> httpx.Response:
    if content is not None:
        return httpx.post(
            server.url + path, content=content, headers={**headers, "Content-Type": "application/json"}, timeout=60
        )
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path, body, param",
    [
        (COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        (COMPLETIONS, {"prompt": 42}, "prompt"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (CHAT, {"messages": USER, "stream": "sometimes"}, "stream"),
    ],
)
def test_wrong_types_are_400_naming_the_field(server, path, body, param):
    error = error_of(post(server, path, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_out_of_range_values_are_400_naming_the_parameter(server, body, param):
    error = error_of(post(server, COMPLETIONS, body), 400)
    assert error["param"] == param


def test_malformed_json_and_empty_messages_are_400(server):
    error = error_of(post(server, CHAT, content=b'{"messages": [}'), 400)
    assert error["code"] == "invalid_json"
    error = error_of(post(server, CHAT, {"messages": []}), 400)
    assert error["param"] == "messages"


def test_over_long_prompt_is_400_with_the_context_length(server):
    prompt = "word " * 400
    error = error_of(post(server, COMPLETIONS, {"prompt": prompt, "max_tokens": 4}), 400)
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in error["message"]
    streamed = post(server, COMPLETIONS, {"prompt": prompt, "max_tokens": 4, "stream": True})
    assert error_of(streamed, 400)["code"] == "context_length_exceeded"


def test_unknown_model_and_plan_are_404(server):
    error = error_of(post(server, CHAT, {"model": "gpt-9", "messages": USER}), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    error = error_of(post(server, CHAT, {"model": MODEL, "messages": USER, "kv_plan": "nope"}), 404)
    assert (error["param"], error["code"]) == ("kv_plan", "plan_not_found")


def test_bad_or_missing_api_key_is_401_but_health_and_metrics_stay_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        error = error_of(post(server, COMPLETIONS, {"prompt": "hi"}, headers=headers), 401)
        assert error["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_fields_are_400_naming_them_and_the_server_serves_after_errors(server):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0, "user": "someone"}
    error = error_of(post(server, COMPLETIONS, {**body, "some_future_field": {"x": 1}}), 400)
    assert (error["param"], error["code"]) == ("some_future_field", "unsupported_parameter")
    response = post(server, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices[0].message.content


def test_unknown_route_is_404_in_the_openai_shape(server):
    error = error_of(httpx.get(server.url + "/v1/nothing-here", headers=AUTH), 404)
    assert error["type"] == "not_found_error"
