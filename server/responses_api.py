"""POST /v1/responses (OpenAI's Responses API), stateless: the body becomes the same
internal chat request /v1/chat/completions runs (`instructions` as the system message,
`input` as the turns), so templating, sampling, admission and errors are chat's; the
outputs are rendered as a `response` object or the Responses event stream.

`text.format` (json_schema, json_object) becomes chat's `response_format` and goes through
the same grammar path (server/structured.py). Not served yet, and refused with a 400
naming the field rather than ignored: `tools` / `tool_choice` (other than "auto" / "none"
without tools), function_call / function_call_output input items, and `previous_response_id` (nothing is
stored, so there is no earlier response to continue)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from headwise.engine.outputs import RequestOutput
from headwise.server.chat import template_messages
from headwise.server.context import RequestContext, usage
from headwise.server.errors import APIError
from headwise.server.generation import GenerationGroup, Job
from headwise.server.openapi import errors, event_stream
from headwise.server.params import sampling_params
from headwise.server.protocol import ChatCompletionRequest
from headwise.server.responses_api_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
)
from headwise.server.structured import check_compiles, response_format_grammar

router = APIRouter()


def check_supported(body: ResponsesRequest) -> None:
    """400 for the fields this server cannot honour, naming each."""
    if body.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id is not supported: this server stores no responses (store is always false); "
            "send the whole conversation in `input`",
            "previous_response_id",
            "unsupported_parameter",
        )
    if body.tools:
        raise APIError(400, "tools are not supported by this server yet", "tools", "unsupported_parameter")
    if body.tool_choice not in (None, "auto", "none"):
        raise APIError(
            400, "tool_choice needs tools, which are not supported yet", "tool_choice", "unsupported_parameter"
        )
    if isinstance(body.input, list):
        for i, item in enumerate(body.input):
            if isinstance(item, (FunctionCallItem, FunctionCallOutputItem)):
                raise APIError(
                    400,
                    f"{item.type} items need tools, which are not supported yet",
                    f"input.{i}",
                    "unsupported_parameter",
                )


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses body means: instructions first (as the system turn),
    then `input` (a string is one user turn)."""
    messages = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        messages += [{"role": item.role, "content": item.text()} for item in body.input]
    fields = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stream": body.stream,
        "kv_plan": body.kv_plan,
        "response_format": None
        if body.text is None or body.text.format is None
        else body.text.format.response_format(),
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
    prompt = await ctx.state.tokenizer_thread.run(ctx.engine.encode_chat, template_messages(chat.messages))
    grammar = response_format_grammar(chat.response_format, "text.format")  # chat's grammar path
    await check_compiles(ctx.engine.grammars, grammar)
    params = sampling_params(chat, len(prompt), ctx.engine.max_model_len, 0, ctx.state.generation_defaults, grammar)
    group = ctx.group([Job(ctx.job_id(0), prompt, params)])
    view = _ResponseView(ctx, body, len(prompt))
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

    def __init__(self, ctx: RequestContext, body: ResponsesRequest, prompt_len: int) -> None:
        self.ctx = ctx
        self.body = body
        self.prompt_len = prompt_len
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0

    def _message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

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
            "tools": [],
            "tool_choice": self.body.tool_choice if isinstance(self.body.tool_choice, str) else "auto",
            "parallel_tool_calls": True if self.body.parallel_tool_calls is None else self.body.parallel_tool_calls,
            "text": {"format": self._format()},
            "store": False,
            "previous_response_id": None,
            "metadata": self.body.metadata or {},
        }

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
        status = _STATUS.get(out.finish_reason or "stop", "completed")
        message_status = "completed" if status == "completed" else "incomplete"
        return self._object(status, [self._message(out.text, message_status)], out)

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def error_event(self, error: APIError) -> dict:
        inner = error.body()["error"]
        return self._event("error", code=inner["code"], message=inner["message"], param=inner["param"])

    async def events(self, group: GenerationGroup) -> AsyncIterator[dict]:
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self._event("response.created", response=self._object("in_progress", [], None))
        yield self._event("response.in_progress", response=self._object("in_progress", [], None))
        yield self._event(
            "response.output_item.added", output_index=0, item={**self._message("", "in_progress"), "content": []}
        )
        yield self._event(
            "response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []}
        )
        sent = ""
        last: RequestOutput | None = None
        async for batch in group.updates():
            for _, out in batch:
                last = out
                if len(out.text) > len(sent):
                    delta, sent = out.text[len(sent) :], out.text
                    yield self._event("response.output_text.delta", **where, delta=delta, logprobs=[])
        assert last is not None and last.finished
        final = self.response(last)
        part = final["output"][0]["content"][0]
        yield self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
        yield self._event("response.content_part.done", **where, part=part)
        yield self._event("response.output_item.done", output_index=0, item=final["output"][0])
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield self._event(kind, response=final)
