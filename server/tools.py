"""A chat request's tools: what the template renders, the grammar that writes the calls, and
the format the output is read back in (server/tool_parsers.py).

`tool_choice`:
- `none` (the default without tools): the tools are not rendered and the output is text;
  the history's calls and results still are.
- `auto` (the default with tools): the model may answer or call; once it opens a call (the
  format's trigger, `<tool_call>` for hermes), the grammar holds it to one of the tools'
  names and that tool's parameter schema, so every call it writes parses.
- `required` / a named function: the grammar admits nothing but calls (of that function),
  one, or one or more when `parallel_tool_calls` is true (OpenAI's default); a named choice
  is one call.
The grammar is an xgrammar structural tag (engine/grammar_spec.py `structural_tag` kind), so it
goes through the same compile cache, worker thread and batch mask as response_format."""

from __future__ import annotations

import json
from dataclasses import dataclass

from headwise.engine.grammar_spec import GrammarSpec
from headwise.engine.json_schema_support import check_enforceable
from headwise.engine.sampling_params import InvalidRequest
from headwise.server.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from headwise.server.tool_parsers import ToolFormat

NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # OpenAI tool objects for the template; None: not rendered
    grammar: GrammarSpec | None
    fmt: ToolFormat | None  # None: the output is plain content
    parallel: bool


def _parameters(tool: Tool, i: int) -> dict:
    schema = tool.function.parameters
    if schema is None:
        return NO_ARGUMENTS
    param = f"tools.{i}.function.parameters"
    if schema.get("type", "object") != "object":
        raise InvalidRequest(
            f"{param} must be an object schema (arguments are a JSON object)", param, "invalid_grammar"
        )
    check_enforceable(schema, param)
    return schema


def _tag(fmt: ToolFormat, tool: Tool, i: int) -> dict:
    begin, end = fmt.tag(tool.function.name)
    # at most one whitespace character in a row: a small model cannot pad until max_tokens
    content = {"type": "json_schema", "json_schema": _parameters(tool, i), "max_whitespace_cnt": 1}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def plan_tools(body: ChatCompletionRequest, fmt: ToolFormat) -> ToolPlan:
    """The request's ToolPlan; a choice without tools, a named function that is not among
    them, or two tools of one name are 400s naming the field."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    parallel = body.parallel_tool_calls is not False
    if choice not in ("none", "auto") and not tools:
        raise InvalidRequest(
            "tool_choice requires tools: the request has none", "tool_choice", "conflicting_parameters"
        )
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise InvalidRequest(
                f"tools.{i}.function.name: a second tool named {tool.function.name!r}",
                f"tools.{i}.function.name",
                "conflicting_parameters",
            )
        seen.add(tool.function.name)
    if choice == "none" or not tools:
        return ToolPlan(None, None, None, parallel)
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in seen:
            raise InvalidRequest(
                f"tool_choice names {choice.function.name!r}, which is not one of the request's tools",
                "tool_choice",
                "conflicting_parameters",
            )
        i = next(i for i, t in enumerate(tools) if t.function.name == choice.function.name)
        form = _calls_only([_tag(fmt, tools[i], i)], fmt, one=True)
    elif choice == "required":
        form = _calls_only([_tag(fmt, t, i) for i, t in enumerate(tools)], fmt, one=not parallel)
    else:
        tags = [_tag(fmt, t, i) for i, t in enumerate(tools)]
        form = {
            "type": "triggered_tags",
            "triggers": [fmt.trigger],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": not parallel,
        }
    source = json.dumps({"type": "structural_tag", "format": form}, ensure_ascii=False, separators=(",", ":"))
    return ToolPlan(rendered, GrammarSpec("structural_tag", source, "tools"), fmt, parallel)


def _calls_only(tags: list[dict], fmt: ToolFormat, one: bool) -> dict:
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": fmt.separator,
        "at_least_one": True,
        "stop_after_first": one,
    }
