"""POST /v1/chat/completions: messages through the model's chat template, n choices."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from headwise.engine.grammar_spec import GrammarSpec
from headwise.engine.outputs import RequestOutput
from headwise.server.context import RequestContext, usage
from headwise.server.errors import APIError
from headwise.server.generation import GenerationGroup, Job
from headwise.server.logprobs import TokenText, chat_logprobs
from headwise.server.openapi import errors, event_stream
from headwise.server.params import sampling_params
from headwise.server.protocol import ChatCompletionRequest, ChatMessage
from headwise.server.responses import ChatCompletionChunk, ChatCompletionResponse
from headwise.server.structured import check_compiles, request_grammar
from headwise.server.tool_parsers import ToolCallStream, message_calls, tool_format
from headwise.server.tools import ToolPlan, plan_tools

router = APIRouter()


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Plain dicts for the chat template; text parts are joined by newlines and OpenAI's newer
    `developer` role is the template's `system`. An assistant turn keeps its `tool_calls`, a
    tool turn its `tool_call_id` (and `name`); tool calls elsewhere, or a tool turn that does
    not say which call it answers, are 400s naming the message."""
    out = []
    for i, m in enumerate(messages):
        turn: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(
                    400,
                    f"only assistant messages carry tool_calls, not {m.role}",
                    f"messages.{i}.tool_calls",
                    "conflicting_parameters",
                )
            turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(
                    400,
                    "a tool message needs the tool_call_id it answers",
                    f"messages.{i}.tool_call_id",
                    "conflicting_parameters",
                )
            turn["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                turn["name"] = m.name
        out.append(turn)
    return out


def check_prefill(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """vLLM's rule: a turn cannot both be continued and have a new one opened after it."""
    if add_generation_prompt and continue_final_message:
        raise APIError(
            400,
            "continue_final_message continues the last message, add_generation_prompt opens a new turn: "
            "set add_generation_prompt to false",
            "continue_final_message",
            "conflicting_parameters",
        )


async def chat_prompt(
    ctx: RequestContext, body: ChatCompletionRequest, grammar: GrammarSpec | None
) -> tuple[list[int], GrammarSpec | None, ToolPlan]:
    """A chat body's prompt ids, its one output constraint (`grammar`, the request's
    response_format or the like, or its tools' grammar; both at once are a 400) compiled,
    and its ToolPlan. /v1/responses goes through here too."""
    tools = plan_tools(body, tool_format(ctx.state.settings.tool_call_parser))
    if tools.grammar is not None and grammar is not None:
        raise APIError(
            400,
            f"{grammar.param} and tool calls cannot constrain one output together: send tool_choice none, or "
            f"leave out {grammar.param}",
            grammar.param,
            "conflicting_parameters",
        )
    prompt = await ctx.state.tokenizer_thread.run(
        ctx.engine.encode_chat,
        template_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=tools.tools,
        chat_template=ctx.state.settings.chat_template_text,
    )
    grammar = grammar or tools.grammar
    await check_compiles(ctx.engine.grammars, grammar)
    return prompt, grammar, tools


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**event_stream(ChatCompletionChunk), **errors(400, 401, 404, 429, 500, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = RequestContext(request, body, "chatcmpl")
    check_prefill(body.add_generation_prompt, body.continue_final_message)
    ctx.check_fits(body.n)
    prompt, grammar, tools = await chat_prompt(ctx, body, request_grammar(body))
    defaults = ctx.state.generation_defaults
    jobs = [
        Job(ctx.job_id(i), prompt, sampling_params(body, len(prompt), ctx.engine.max_model_len, i, defaults, grammar))
        for i in range(body.n)
    ]
    group = ctx.group(jobs)
    view = _ChatView(ctx, body, len(prompt), TokenText(ctx.engine.tokenizer), tools)
    if body.stream:
        return await ctx.stream(group, view.chunks)
    outputs = await ctx.collect(group)
    if isinstance(outputs, Response):
        return outputs
    return JSONResponse(view.response(outputs))


class _ChatView:
    """Renders outputs as a `chat.completion` response or `chat.completion.chunk`s."""

    def __init__(
        self, ctx: RequestContext, body: ChatCompletionRequest, prompt_len: int, token_text: TokenText, tools: ToolPlan
    ) -> None:
        self.ctx = ctx
        self.body = body
        self.prompt_len = prompt_len
        self.token_text = token_text
        self.tools = tools

    def _logprobs(self, out: RequestOutput, start: int) -> dict | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs((out.logprobs or [])[start:], self.token_text)

    def _base(self, kind: str) -> dict:
        return {"id": self.ctx.id, "object": kind, "created": self.ctx.created, "model": self.ctx.model}

    def _message(self, out: RequestOutput) -> tuple[dict, str | None]:
        """The assistant message of one choice and its finish_reason (`tool_calls` when the
        output is calls that ended as the grammar or the model meant them to)."""
        if self.tools.fmt is None:
            return {"role": "assistant", "content": out.text}, out.finish_reason
        parsed = self.tools.fmt.parse(out.text, final=True)
        calls = message_calls(parsed, [], self.tools.parallel)
        if not calls:
            return {"role": "assistant", "content": parsed.content}, out.finish_reason
        message = {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}
        return message, "tool_calls" if out.finish_reason == "stop" else out.finish_reason

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            message, finish_reason = self._message(out)
            choices.append(
                {"index": i, "message": message, "logprobs": self._logprobs(out, 0), "finish_reason": finish_reason}
            )
        return {**self._base("chat.completion"), "choices": choices, "usage": usage([self.prompt_len], outputs)}

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    async def chunks(self, group: GenerationGroup) -> AsyncIterator[dict]:
        if self.tools.fmt is not None:
            async for chunk in self._tool_chunks(group):
                yield chunk
            return
        sent_text = [""] * self.body.n
        sent_tokens = [0] * self.body.n
        for i in range(self.body.n):
            yield self._chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for batch in group.updates():
            for i, out in batch:
                delta = out.text[len(sent_text[i]) :] if len(out.text) > len(sent_text[i]) else ""
                if not (delta or len(out.token_ids) > sent_tokens[i] or out.finished):
                    continue
                logprobs = self._logprobs(out, sent_tokens[i])
                sent_text[i] += delta
                sent_tokens[i] = len(out.token_ids)
                yield self._chunk(
                    i, {"content": delta} if delta else {}, logprobs, out.finish_reason if out.finished else None
                )
        async for chunk in self._usage_chunk(group):
            yield chunk

    async def _tool_chunks(self, group: GenerationGroup) -> AsyncIterator[dict]:
        """The stream when the output may hold tool calls: content and OpenAI's tool-call
        deltas (server/tool_parsers.py ToolCallStream), then the finish reason."""
        assert self.tools.fmt is not None
        streams = [ToolCallStream(self.tools.fmt, self.tools.parallel) for _ in range(self.body.n)]
        sent_tokens = [0] * self.body.n
        for i in range(self.body.n):
            yield self._chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for batch in group.updates():
            for i, out in batch:
                logprobs = self._logprobs(out, sent_tokens[i])
                sent_tokens[i] = len(out.token_ids)
                deltas = streams[i].update(out.text, final=out.finished)
                for j, delta in enumerate(deltas):
                    yield self._chunk(i, delta, logprobs if j == 0 else None, None)
                if out.finished:
                    reason = out.finish_reason
                    if streams[i].called and reason == "stop":
                        reason = "tool_calls"
                    yield self._chunk(i, {}, logprobs if not deltas else None, reason)
                elif not deltas and logprobs is not None:
                    yield self._chunk(i, {}, logprobs, None)
        async for chunk in self._usage_chunk(group):
            yield chunk

    async def _usage_chunk(self, group: GenerationGroup) -> AsyncIterator[dict]:
        if self.body.include_usage:
            yield {
                **self._base("chat.completion.chunk"),
                "choices": [],
                "usage": usage([self.prompt_len], [o for o in group.latest if o is not None]),
            }
