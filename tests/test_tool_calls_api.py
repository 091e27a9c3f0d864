"""Tool calling through the OpenAI API on the default model (official `openai` client and
langchain-openai): forced calls validate against the tool's schema, a two-turn loop renders
the assistant's calls and the tool's result into the prompt, streamed calls equal the
non-streamed ones, and the shipped tool template is what renders them."""

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
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(model=MODEL, kv_cache_mb=64, max_model_len=2048)
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def create(client, **fields):
    return client.chat.completions.create(**{"model": MODEL, "temperature": 0, "max_tokens": 60, **fields})


@pytest.fixture(scope="module")
def named_reply(client):
    return create(client, messages=ASK, tools=TOOLS, tool_choice=NAMED)


def test_a_named_tool_choice_returns_that_tool_with_valid_arguments(named_reply):
    choice = named_reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_streamed_tool_calls_equal_the_non_streamed_ones(client, named_reply):
    chunks = list(create(client, messages=ASK, tools=TOOLS, tool_choice=NAMED, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
            call["arguments"] += delta.function.arguments or ""
    (expected,) = named_reply.choices[0].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (expected.function.name, expected.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(chunk.choices[0].delta.content in (None, "") for chunk in chunks)


def test_a_two_turn_loop_renders_the_call_and_the_result(server, client, named_reply):
    (call,) = named_reply.choices[0].message.tool_calls
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    final = create(client, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    tokens = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=60).json()
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=60).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in prompt  # each tool, as the template lists them
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in prompt
    assert (
        '<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response><|im_end|>' in prompt
    )


def test_required_with_one_call_validates(client):
    reply = create(client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    (call,) = reply.choices[0].message.tool_calls
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert reply.choices[0].finish_reason == "tool_calls"


def test_bad_tool_requests_are_400s_naming_the_field(client):
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            create(client, messages=ASK, **fields)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        create(client, messages=[*ASK, {"role": "tool", "content": "x"}])
    assert e.value.body["param"] == "messages.1.tool_call_id"


def test_langchain_bind_tools_with_a_tool_choice_returns_tool_calls(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=60)
    reply = llm.bind_tools(TOOLS, tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)


class City(BaseModel):
    city: str
    country: str


def test_langchain_with_structured_output_returns_the_model_instance(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=100)
    city = llm.with_structured_output(City).invoke("Give me a city and its country as JSON.")
    assert isinstance(city, City)


RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's flat tools
RESPONSES_NAMED = {"type": "function", "name": "get_weather"}


def test_responses_a_tool_round_trip_with_the_official_client(client):
    first = client.responses.create(
        model=MODEL,
        input=ASK[0]["content"],
        tools=RESPONSES_TOOLS,
        tool_choice=RESPONSES_NAMED,
        temperature=0,
        max_output_tokens=60,
    )
    (call,) = first.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    items = [
        {"role": "user", "content": ASK[0]["content"]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'},
    ]
    second = client.responses.create(
        model=MODEL, input=items, tools=RESPONSES_TOOLS, tool_choice="none", temperature=0, max_output_tokens=8
    )
    assert second.output[0].type == "message" and second.output_text
    # streamed: the argument deltas make the done event's arguments, which are the non-streamed ones
    events = list(
        client.responses.create(
            model=MODEL,
            input=ASK[0]["content"],
            tools=RESPONSES_TOOLS,
            tool_choice=RESPONSES_NAMED,
            temperature=0,
            max_output_tokens=60,
            stream=True,
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done.arguments == call.arguments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].name == "get_weather"
