"""POST /v1/chat/completions: messages through the model's chat template, n choices."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

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

router = APIRouter()


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Plain role/content dicts for the chat template; text parts are joined by newlines and
    OpenAI's newer `developer` role is the template's `system`."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


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


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**event_stream(ChatCompletionChunk), **errors(400, 401, 404, 429, 500, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = RequestContext(request, body, "chatcmpl")
    check_prefill(body.add_generation_prompt, body.continue_final_message)
    ctx.check_fits(body.n)
    prompt = await ctx.state.tokenizer_thread.run(
        ctx.engine.encode_chat,
        template_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    defaults = ctx.state.generation_defaults
    grammar = request_grammar(body)
    await check_compiles(ctx.engine.grammars, grammar)
    jobs = [
        Job(ctx.job_id(i), prompt, sampling_params(body, len(prompt), ctx.engine.max_model_len, i, defaults, grammar))
        for i in range(body.n)
    ]
    group = ctx.group(jobs)
    view = _ChatView(ctx, body, len(prompt), TokenText(ctx.engine.tokenizer))
    if body.stream:
        return await ctx.stream(group, view.chunks)
    outputs = await ctx.collect(group)
    if isinstance(outputs, Response):
        return outputs
    return JSONResponse(view.response(outputs))


class _ChatView:
    """Renders outputs as a `chat.completion` response or `chat.completion.chunk`s."""

    def __init__(
        self, ctx: RequestContext, body: ChatCompletionRequest, prompt_len: int, token_text: TokenText
    ) -> None:
        self.ctx = ctx
        self.body = body
        self.prompt_len = prompt_len
        self.token_text = token_text

    def _logprobs(self, out: RequestOutput, start: int) -> dict | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs((out.logprobs or [])[start:], self.token_text)

    def _base(self, kind: str) -> dict:
        return {"id": self.ctx.id, "object": kind, "created": self.ctx.created, "model": self.ctx.model}

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": self._logprobs(out, 0),
                "finish_reason": out.finish_reason,
            }
            for i, out in enumerate(outputs)
        ]
        return {**self._base("chat.completion"), "choices": choices, "usage": usage([self.prompt_len], outputs)}

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    async def chunks(self, group: GenerationGroup) -> AsyncIterator[dict]:
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
        if self.body.include_usage:
            yield {
                **self._base("chat.completion.chunk"),
                "choices": [],
                "usage": usage([self.prompt_len], [o for o in group.latest if o is not None]),
            }
