"""Structured outputs and logit_bias through the OpenAI API (official `openai` client, real model),
and the 400s for fields that would change the output but are not implemented."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings

MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "Give me a city and its country as JSON."}]


class City(BaseModel):
    city: str
    country: str
    population_millions: float


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(model=MODEL, kv_cache_mb=64, max_model_len=1024)
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=City, max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert choice.message.parsed == City.model_validate_json(choice.message.content)


def test_json_object_output_is_a_json_object(client):
    ask = [{"role": "user", "content": "Reply with a JSON object with keys name and age."}]
    r = client.chat.completions.create(
        model=MODEL, messages=ask, response_format={"type": "json_object"}, max_tokens=80, temperature=0
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_structured_outputs_choice_regex_and_n_choices_all_match(server):
    for constraint, check in [
        ({"choice": ["red", "green", "blue"]}, lambda t: t in {"red", "green", "blue"}),
        ({"regex": "[0-9]{2}-[A-Z]{3}"}, lambda t: len(t) == 6 and t[:2].isdigit() and t[3:].isupper()),
    ]:
        body = {"messages": ASK, "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 5}
        r = post(server, "/v1/chat/completions", {**body, "structured_outputs": constraint})
        assert r.status_code == 200, r.text
        texts = [c["message"]["content"] for c in r.json()["choices"]]
        assert all(check(t) for t in texts), texts
        assert {c["finish_reason"] for c in r.json()["choices"]} == {"stop"}


def test_completions_take_a_json_schema_too(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9}}, "required": ["n"]}
    r = post(server, "/v1/completions", {"prompt": "A number:", "max_tokens": 20, "guided_json": schema})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), schema)


def test_streamed_constrained_output_equals_the_non_streamed_one(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=40, temperature=0, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == whole


def test_logit_bias_forces_and_bans_tokens(server):
    tok = server.state.engine.tokenizer
    target = tok.encode(" banana")[0]
    r = post(
        server,
        "/v1/completions",
        {"prompt": "I like", "max_tokens": 3, "temperature": 0, "logit_bias": {str(target): 100}},
    )
    assert r.json()["choices"][0]["text"] == tok.decode([target] * 3)
    plain = post(server, "/v1/completions", {"prompt": "I like", "max_tokens": 1, "temperature": 0})
    first = tok.encode(plain.json()["choices"][0]["text"])[0]
    banned = post(
        server,
        "/v1/completions",
        {"prompt": "I like", "max_tokens": 1, "temperature": 0, "logit_bias": {str(first): -100}},
    )
    assert tok.encode(banned.json()["choices"][0]["text"])[0] != first


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "vocabulary size"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"not": {}}}}},
            "response_format.json_schema.schema",
            "'not' is not supported",
        ),
        (
            {"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}},
            "structured_outputs.json",
            "uniqueItems",
        ),
        (
            {"structured_outputs": {"json": {"type": "string", "format": "iri"}}},
            "structured_outputs.json",
            "format 'iri'",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "does not compile"),
        ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs.grammar", "foo"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"modalities": ["text", "audio"]}, "modalities", "not supported"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "not supported"),
        ({"priority": 5}, "priority", "not supported"),
        ({"store": True}, "store", "not supported"),
        ({"some_future_field": 1}, "some_future_field", "unknown field"),
        ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]}, "messages.0.audio", "not supported"),
    ],
)
def test_unenforceable_or_unimplemented_fields_are_400_naming_them(server, extra, param, words):
    error = error_of(post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **extra}))
    assert error["param"] == param
    assert words in error["message"]


def test_fields_without_effect_on_the_output_are_accepted(server):
    body = {"messages": ASK, "max_tokens": 2, "user": "u", "metadata": {"k": "v"}, "store": False}
    r = post(server, "/v1/chat/completions", {**body, "service_tier": "auto", "best_of": 1, "modalities": ["text"]})
    assert r.status_code == 200, r.text


def test_responses_text_format_json_schema_goes_through_the_same_grammar(client):
    schema = City.model_json_schema()
    response = client.responses.create(
        model=MODEL,
        input=ASK[0]["content"],
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        max_output_tokens=200,
        temperature=0,
    )
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"
