"""POST /v1/responses through the official openai client against a live server on the
tiny model: the text equals what chat gives for the same turns, usage carries cached
tokens and headwise's kv fields, streaming sends the Responses event types whose deltas
make the final text, function_call items are chat's tool turns, and what is not served
(previous_response_id) is a 400 naming the field; tool calls on the real model:
tests/test_tool_calls_api.py. text.format json_schema on the real model:
tests/test_structured_api.py."""

from __future__ import annotations

import openai
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings
from tests.tiny_model import add_chat_template, write_tiny_llama

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    add_chat_template(model_dir)
    config = EngineConfig(model=model_dir, kv_cache_mb=8, max_model_len=128)
    with BackgroundServer(ServerSettings(port=0, served_model_name=MODEL), lambda: LLMEngine(config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_text(client, messages: list[dict], max_tokens: int) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_a_string_input_gives_chats_text_and_usage(client):
    response = client.responses.create(model=MODEL, input="w1 w2 w3", max_output_tokens=5, temperature=0)
    assert response.object == "response" and response.model == MODEL
    assert response.output_text == chat_text(client, [{"role": "user", "content": "w1 w2 w3"}], 5)
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    usage = response.usage
    assert usage.output_tokens <= 5 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    extra = response.usage.model_extra
    assert extra["kv_bytes"] > 0 and extra["kv_bytes_decode"] > 0
    if usage.output_tokens == 5:
        assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    else:
        assert response.status == "completed"
    assert response.store is False


def test_instructions_and_items_become_the_chat_turns(client):
    items = [
        {"role": "user", "content": "w1"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "w2"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "w3 w4"}]},
    ]
    response = client.responses.create(model=MODEL, instructions="w9", input=items, max_output_tokens=4, temperature=0)
    turns = [
        {"role": "system", "content": "w9"},
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w2"},
        {"role": "user", "content": "w3 w4"},
    ]
    assert response.output_text == chat_text(client, turns, 4)
    assert response.instructions == "w9"


def test_streaming_sends_the_responses_events_whose_deltas_make_the_text(client):
    stream = client.responses.create(model=MODEL, input="w5 w6", max_output_tokens=6, temperature=0, stream=True)
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text
    assert deltas == chat_text(client, [{"role": "user", "content": "w5 w6"}], 6)
    assert 1 <= final.usage.output_tokens <= 6


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
        ({"tools": [{"type": "function", "name": "f.g"}]}, "tools.0.name"),  # OpenAI's name rule
    ],
)
def test_what_is_not_served_is_a_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="w1", max_output_tokens=2, **extra)
    assert e.value.body["param"] == param


def test_function_call_items_are_chats_tool_turns(client):
    """function_call / function_call_output items are the assistant's tool calls and the tool
    turns, so the answer equals chat's for those messages (greedy)."""
    items = [
        {"role": "user", "content": "w1"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "w2"},
        {"type": "function_call_output", "call_id": "c2", "output": "w3"},
    ]
    response = client.responses.create(model=MODEL, input=items, max_output_tokens=4, temperature=0)
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
    ]
    messages = [
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "w2"},
        {"role": "tool", "tool_call_id": "c2", "content": "w3"},
    ]
    assert response.output_text == chat_text(client, messages, 4)


def test_unknown_model_and_bad_values_are_chats_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="w1")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="w1", temperature=3)
    assert e.value.body["param"] == "temperature"
