"""POST /v1/responses (OpenAI's Responses API), stateless: the body becomes the same
internal chat request /v1/chat/completions runs (`instructions` as the system message,
`input` as the turns: messages, `function_call` items as an assistant turn's tool calls,
`function_call_output` items as tool turns), so templating, tools, sampling, admission and
errors are chat's; the outputs are rendered as a `response` object (a message item for the
text, a `function_call` item per call) or the Responses event stream.

`text.format` (json_schema, json_object) becomes chat's `response_format` and goes through
the same grammar path (server/structured.py); `tools` / `tool_choice` / `parallel_tool_calls`
become chat's (server/tools.py). `previous_response_id` is a 400 naming it: nothing is
stored, so there is no earlier response to continue."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from headwise.engine.outputs import RequestOutput
from headwise.server.chat import chat_prompt
from headwise.server.context import RequestContext, usage
from headwise.server.errors import APIError
from headwise.server.generation import GenerationGroup, Job
from headwise.server.openapi import errors, event_stream
from headwise.server.params import sampling_params
from headwise.server.protocol import ChatCompletionRequest
from headwise.server.responses_api_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
)
from headwise.server.structured import response_format_grammar
from headwise.server.tool_parsers import ToolCallStream, message_calls
from headwise.server.tools import ToolPlan

router = APIRouter()


def check_supported(body: ResponsesRequest) -> None:
    """400 for what this server cannot honour, naming it."""
    if body.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id is not supported: this server stores no responses (store is always false); "
            "send the whole conversation in `input`",
            "previous_response_id",
            "unsupported_parameter",
        )


def _turns(body: ResponsesRequest) -> list[dict]:
    """Chat messages for `input`: consecutive function_call items are one assistant turn's calls."""
    messages: list[dict] = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for item in body.input:
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append({"role": item.role, "content": item.text()})
    return messages


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses body means."""
    choice = body.tool_choice
    fields = {
        "model": body.model,
        "messages": _turns(body),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stream": body.stream,
        "kv_plan": body.kv_plan,
        "response_format": None
        if body.text is None or body.text.format is None
        else body.text.format.response_format(),
        "tools": None
        if body.tools is None
        else [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in body.tools],
        "tool_choice": {"type": "function", "function": {"name": choice.name}}
        if isinstance(choice, FunctionToolChoice)
        else choice,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})


@router.post(
    "/v1/responses",
    response_model=ResponseObject,
    responses={**event_stream(ResponseStreamEvent), **errors(400, 401, 404, 429, 500, 503)},
)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    check_supported(body)
    chat = chat_request(body)
    ctx = RequestContext(request, chat, "resp")
    ctx.check_fits(1)
    grammar = response_format_grammar(chat.response_format, "text.format")  # chat's grammar path
    prompt, grammar, tools = await chat_prompt(ctx, chat, grammar)
    params = sampling_params(chat, len(prompt), ctx.engine.max_model_len, 0, ctx.state.generation_defaults, grammar)
    group = ctx.group([Job(ctx.job_id(0), prompt, params)])
    view = _ResponseView(ctx, body, len(prompt), tools)
    if body.stream:
        return await ctx.stream(group, view.events, frame=named_event, error_payload=view.error_event, done=None)
    outputs = await ctx.collect(group)
    if isinstance(outputs, Response):
        return outputs
    return JSONResponse(view.response(outputs[0]))


def named_event(payload: dict) -> str:
    """An SSE event whose name is its `type`, as the Responses API streams them."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


_STATUS = {"stop": "completed", "length": "incomplete", "abort": "cancelled"}


class _ResponseView:
    """Renders one choice as a `response` object, or as the Responses event stream."""

    def __init__(self, ctx: RequestContext, body: ResponsesRequest, prompt_len: int, tools: ToolPlan) -> None:
        self.ctx = ctx
        self.body = body
        self.prompt_len = prompt_len
        self.tools = tools
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.call_ids: list[str] = []  # shared with the stream, so its items are the final ones
        self.sequence = 0

    def _message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _call(call_id: str, name: str, arguments: str, status: str) -> dict:
        item_id = "fc_" + call_id.removeprefix("call_")
        return {
            "type": "function_call",
            "id": item_id,
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": status,
        }

    def _object(self, status: str, output: list[dict], out: RequestOutput | None) -> dict:
        return {
            "id": self.ctx.id,
            "object": "response",
            "created_at": self.ctx.created,
            "status": status,
            "model": self.ctx.model,
            "output": output,
            "usage": None if out is None else self._usage(out),
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None,
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "temperature": self.body.temperature,
            "top_p": self.body.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in self.body.tools or []],
            "tool_choice": self._tool_choice(),
            "parallel_tool_calls": True if self.body.parallel_tool_calls is None else self.body.parallel_tool_calls,
            "text": {"format": self._format()},
            "store": False,
            "previous_response_id": None,
            "metadata": self.body.metadata or {},
        }

    def _tool_choice(self) -> str | dict:
        choice = self.body.tool_choice
        if choice is None:
            return "auto"
        return choice if isinstance(choice, str) else choice.model_dump()

    def _format(self) -> dict:
        given = None if self.body.text is None else self.body.text.format
        return {"type": "text"} if given is None else given.model_dump(by_alias=True, exclude_none=True)

    def _usage(self, out: RequestOutput) -> dict:
        chat = usage([self.prompt_len], [out])
        return {
            "input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"],
            "kv_bytes": chat["kv_bytes"],
            "kv_bytes_decode": chat["kv_bytes_decode"],
        }

    def response(self, out: RequestOutput) -> dict:
        """The finished `response`: a message item for the text (also when it is empty and there
        is no call), then one function_call item per call."""
        status = _STATUS.get(out.finish_reason or "stop", "completed")
        item_status = "completed" if status == "completed" else "incomplete"
        if self.tools.fmt is None:
            return self._object(status, [self._message(out.text, item_status)], out)
        parsed = self.tools.fmt.parse(out.text, final=True)
        calls = message_calls(parsed, self.call_ids, self.tools.parallel)
        output = [self._message(parsed.content, item_status)] if parsed.content or not calls else []
        for call in calls:
            fn = call["function"]
            output.append(self._call(call["id"], fn["name"], fn["arguments"], item_status))
        return self._object(status, output, out)

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def error_event(self, error: APIError) -> dict:
        inner = error.body()["error"]
        return self._event("error", code=inner["code"], message=inner["message"], param=inner["param"])

    def _open_message(self, index: int) -> list[dict]:
        where = {"item_id": self.message_id, "output_index": index, "content_index": 0}
        return [
            self._event(
                "response.output_item.added",
                output_index=index,
                item={**self._message("", "in_progress"), "content": []},
            ),
            self._event(
                "response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}
            ),
        ]

    async def events(self, group: GenerationGroup) -> AsyncIterator[dict]:
        """response.created / in_progress, then per output item its `added`, its deltas
        (output_text.delta for the message, function_call_arguments.delta for a call) and, once
        the output is finished, its `done` events; then response.completed (or incomplete)."""
        yield self._event("response.created", response=self._object("in_progress", [], None))
        yield self._event("response.in_progress", response=self._object("in_progress", [], None))
        stream = None if self.tools.fmt is None else ToolCallStream(self.tools.fmt, self.tools.parallel, self.call_ids)
        opened: dict[str, int] = {}  # item id -> output index
        if stream is None:
            opened[self.message_id] = 0
            for event in self._open_message(0):
                yield event
        sent = ""
        last: RequestOutput | None = None
        async for batch in group.updates():
            for _, out in batch:
                last = out
                if stream is None:
                    deltas = [{"content": out.text[len(sent) :]}] if len(out.text) > len(sent) else []
                    sent = out.text
                else:
                    deltas = stream.update(out.text, final=out.finished)
                for delta in deltas:
                    if delta.get("content"):
                        if self.message_id not in opened:
                            opened[self.message_id] = len(opened)
                            for event in self._open_message(opened[self.message_id]):
                                yield event
                        where = {"item_id": self.message_id, "output_index": opened[self.message_id]}
                        yield self._event(
                            "response.output_text.delta", **where, content_index=0, delta=delta["content"], logprobs=[]
                        )
                    for call in delta.get("tool_calls", []):
                        call_id = self.call_ids[call["index"]]
                        item = self._call(call_id, call["function"].get("name", ""), "", "in_progress")
                        if "id" in call:
                            opened[item["id"]] = len(opened)
                            yield self._event("response.output_item.added", output_index=opened[item["id"]], item=item)
                        elif call["function"]["arguments"]:
                            yield self._event(
                                "response.function_call_arguments.delta",
                                item_id=item["id"],
                                output_index=opened[item["id"]],
                                delta=call["function"]["arguments"],
                            )
        assert last is not None and last.finished
        final = self.response(last)
        for item in final["output"]:
            if item["id"] not in opened:  # an empty message: added and done at once
                opened[item["id"]] = len(opened)
                for event in self._open_message(opened[item["id"]]):
                    yield event
            index = opened[item["id"]]
            if item["type"] == "message":
                where = {"item_id": item["id"], "output_index": index, "content_index": 0}
                part = item["content"][0]
                yield self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
                yield self._event("response.content_part.done", **where, part=part)
            else:
                yield self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            yield self._event("response.output_item.done", output_index=index, item=item)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield self._event(kind, response=final)
