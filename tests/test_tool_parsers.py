"""Tool calls read back from generated text (server/tool_parsers.py), model-free: the hermes
and llama3_json formats, what is content and what is a call, that a stream's deltas add up to
the non-streamed message for every split of the text, and the grammar a request's tools
build (server/tools.py)."""

from __future__ import annotations

import json

import pytest

from headwise.engine.sampling_params import InvalidRequest
from headwise.server.protocol import ChatCompletionRequest
from headwise.server.tool_parsers import FORMATS, ToolCallStream, message_calls, scan_object
from headwise.server.tools import plan_tools

HERMES, LLAMA = FORMATS["hermes"], FORMATS["llama3_json"]
ARGS = '{"city": "Paris", "tags": ["a}", "b\\"]"], "n": 12}'
TWO = f'<tool_call>\n{{"name": "weather", "arguments": {ARGS}}}\n</tool_call>\n<tool_call>\n{{"name": "add", "arguments": {{}}}}\n</tool_call>'


def calls_of(fmt, text):
    parsed = fmt.parse(text, final=True)
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls], parsed.valid


def test_hermes_blocks_are_calls_with_their_arguments_text_verbatim():
    assert calls_of(HERMES, "Let me check." + TWO) == ("Let me check.", [("weather", ARGS), ("add", "{}")], True)
    assert json.loads(ARGS)["tags"] == ["a}", 'b"]']  # braces and quotes inside strings do not end it


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # object not closed
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',  # name not a string
        '<tool_call>\n{"name": "f", "arguments": "x"}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "f", "arguments": {}, "extra": 1}\n</tool_call>',
        '<tool_call>\n{"name": "f"}\n</tool_call>',  # no arguments
        '<tool_call>\n{"name": "f", "arguments": {}}',  # cut before </tool_call> (max_tokens)
        "<tool_call>not json</tool_call>",
    ],
)
def test_a_block_that_is_not_a_call_makes_the_whole_output_content(text):
    assert calls_of(HERMES, text) == (text, [], False)


def test_text_without_calls_is_content_in_both_formats():
    assert calls_of(HERMES, "It is sunny.") == ("It is sunny.", [], True)
    assert calls_of(LLAMA, "It is sunny.") == ("It is sunny.", [], True)


def test_llama3_json_objects_after_the_python_tag_separated_by_semicolons():
    text = f'<|python_tag|>{{"name": "weather", "parameters": {ARGS}}}; {{"name": "add", "arguments": {{}}}}'
    assert calls_of(LLAMA, text) == ("", [("weather", ARGS), ("add", "{}")], True)
    assert calls_of(LLAMA, '{"name": "f", "parameters": {}} trailing') == (
        '{"name": "f", "parameters": {}} trailing',
        [],
        False,
    )


def test_scan_of_an_unfinished_object_reports_open_spans():
    text = '{"name": "f", "arguments": {"a": [1, '
    obj = scan_object(text, 0)
    assert obj.end is None and not obj.broken
    assert obj.spans["name"] == (9, 12) and obj.spans["arguments"] == (27, None)


def reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(calls):
                assert call["function"]["arguments"] == "" and call["id"].startswith("call_")
                calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
            else:
                assert "name" not in call["function"] and "id" not in call
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize(
    "fmt, text",
    [
        (HERMES, "Sure." + TWO),
        (HERMES, "no calls here, but a < and <tool in the text"),
        (LLAMA, f'<|python_tag|>{{"name": "weather", "parameters": {ARGS}}}; {{"name": "add", "arguments": {{}}}}'),
        (LLAMA, "plain answer"),
    ],
)
@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_stream_deltas_add_up_to_the_message_for_any_split(fmt, text, step):
    """Fed the text `step` characters at a time (then finished), the deltas reassemble to the
    content and calls of the non-streamed parse, ids included."""
    stream = ToolCallStream(fmt, parallel=True)
    deltas = []
    for end in range(step, len(text), step):
        deltas += stream.update(text[:end], final=False)
    deltas += stream.update(text, final=True)
    content, calls = reassemble(deltas)
    parsed = fmt.parse(text, final=True)
    expected = message_calls(parsed, list(stream.ids), parallel=True)
    assert content == parsed.content
    assert calls == [{"id": c["id"], **c["function"]} for c in expected]


def test_without_parallel_calls_only_the_first_call_counts():
    stream = ToolCallStream(HERMES, parallel=False)
    _, calls = reassemble(stream.update(TWO, final=True))
    assert [c["name"] for c in calls] == ["weather"]
    assert [c["function"]["name"] for c in message_calls(HERMES.parse(TWO, True), [], parallel=False)] == ["weather"]


def test_content_that_may_open_a_call_is_held_back_until_it_does_not():
    stream = ToolCallStream(HERMES, parallel=True)
    assert stream.update("Hi <tool_", final=False) == [{"content": "Hi "}]
    assert stream.update("Hi <tool_x", final=False) == [{"content": "<tool_x"}]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "add"}},
]


def plan(**fields):
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})
    return plan_tools(body, HERMES)


def test_tool_choice_decides_the_grammar():
    assert plan().grammar is None and plan(tools=TOOLS, tool_choice="none").tools is None
    auto = json.loads(plan(tools=TOOLS).grammar.source)["format"]
    assert auto["type"] == "triggered_tags" and auto["triggers"] == ["<tool_call>"]
    assert [t["begin"] for t in auto["tags"]] == [
        '<tool_call>\n{"name": "weather", "arguments": ',
        '<tool_call>\n{"name": "add", "arguments": ',
    ]
    assert auto["tags"][1]["content"]["json_schema"] == {"type": "object", "properties": {}}
    required = json.loads(plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).grammar.source)
    assert (required["format"]["at_least_one"], required["format"]["stop_after_first"]) == (True, True)
    named = json.loads(plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}).grammar.source)
    assert [t["begin"] for t in named["format"]["tags"]] == ['<tool_call>\n{"name": "add", "arguments": ']


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "tools.1.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
            "tools.0.function.parameters",
        ),
    ],
)
def test_tools_that_cannot_be_served_are_400s_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as e:
        plan(**fields)
    assert e.value.param == param
