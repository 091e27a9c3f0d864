"""POST /v1/completions: prompts as text or token ids (one or a batch), n choices each."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from headwise.engine.outputs import RequestOutput
from headwise.server.context import RequestContext, usage
from headwise.server.errors import APIError
from headwise.server.generation import GenerationGroup, Job
from headwise.server.logprobs import TokenText, completion_logprobs
from headwise.server.openapi import errors, event_stream
from headwise.server.params import sampling_params
from headwise.server.protocol import CompletionRequest
from headwise.server.responses import CompletionChunk, CompletionResponse
from headwise.server.structured import check_compiles, request_grammar

router = APIRouter()


def prompt_count(prompt: str | list) -> int:
    """How many prompts the body holds: one text, one id list, or a list of either."""
    return 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else len(prompt)


def prompt_ids(prompt: str | list, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """Token ids per prompt, and each prompt's text (for echo): as sent, or decoded from the
    ids, which must be in the vocabulary before anything decodes them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    ids, texts = [], []
    for item in prompt:
        if isinstance(item, str):
            ids.append(tokenizer.encode(item))
            texts.append(item)
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt token ids must be in [0, {vocab_size}) (the vocabulary size), got {bad[:5]}",
                    "prompt",
                    "invalid_value",
                )
            ids.append(list(item))
            texts.append(tokenizer.decode(item))
        if not ids[-1]:
            raise APIError(400, "prompt must contain at least one token", "prompt", "empty_prompt")
    return ids, texts


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**event_stream(CompletionChunk), **errors(400, 401, 404, 429, 500, 503)},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = RequestContext(request, body, "cmpl")
    ctx.check_fits(prompt_count(body.prompt) * body.n)
    tokenizer = ctx.engine.tokenizer
    prompts, texts = await ctx.state.tokenizer_thread.run(
        prompt_ids, body.prompt, tokenizer, ctx.engine.model_config.vocab_size
    )
    grammar = request_grammar(body)
    await check_compiles(ctx.engine.grammars, grammar)
    n = body.n
    defaults = ctx.state.generation_defaults
    jobs = [
        Job(ctx.job_id(p * n + i), ids, sampling_params(body, len(ids), ctx.engine.max_model_len, i, defaults, grammar))
        for p, ids in enumerate(prompts)
        for i in range(n)
    ]
    group = ctx.group(jobs)
    view = _CompletionView(ctx, body, prompts, texts, TokenText(tokenizer))
    if body.stream:
        return await ctx.stream(group, view.chunks)
    outputs = await ctx.collect(group)
    if isinstance(outputs, Response):
        return outputs
    return JSONResponse(view.response(outputs))


class _CompletionView:
    """Renders outputs as a `text_completion` response or stream chunks."""

    def __init__(
        self,
        ctx: RequestContext,
        body: CompletionRequest,
        prompts: list[list[int]],
        texts: list[str],
        token_text: TokenText,
    ) -> None:
        self.ctx = ctx
        self.body = body
        self.prompts = prompts
        self.texts = texts
        self.token_text = token_text

    def _prompt_of(self, index: int) -> int:
        return index // self.body.n

    def _echo(self, index: int, out: RequestOutput) -> tuple[str, dict | None]:
        p = self._prompt_of(index)
        logprobs = None
        if self.body.logprobs is not None:
            entries = out.prompt_logprobs or [None] * len(self.prompts[p])
            logprobs = completion_logprobs(entries, self.token_text, self.prompts[p], 0)
        return self.texts[p], logprobs

    def _generated_logprobs(self, out: RequestOutput, start: int, offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        return completion_logprobs((out.logprobs or [])[start:], self.token_text, out.token_ids[start:], offset)

    def _chunk(self, choices: list[dict], extra: dict | None = None) -> dict:
        return {
            "id": self.ctx.id,
            "object": "text_completion",
            "created": self.ctx.created,
            "model": self.ctx.model,
            "choices": choices,
            **(extra or {}),
        }

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            text, logprobs = self._echo(i, out) if self.body.echo else ("", None)
            generated = self._generated_logprobs(out, 0, len(text))
            if logprobs is not None and generated is not None:
                logprobs = {key: logprobs[key] + generated[key] for key in logprobs}
            choices.append(
                {
                    "index": i,
                    "text": text + out.text,
                    "logprobs": logprobs if logprobs else generated,
                    "finish_reason": out.finish_reason,
                }
            )
        prompt_lens = [len(ids) for ids in self.prompts]
        return self._chunk(choices, {"usage": usage(prompt_lens, outputs)})

    async def chunks(self, group: GenerationGroup) -> AsyncIterator[dict]:
        count = len(self.prompts) * self.body.n
        sent_text = [""] * count
        sent_tokens = [0] * count
        offsets = [0] * count
        if self.body.echo:
            for i, out in enumerate(group.latest):
                text, logprobs = self._echo(i, out)
                offsets[i] = len(text)
                yield self._chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": None}])
        async for batch in group.updates():
            for i, out in batch:
                delta = out.text[len(sent_text[i]) :] if len(out.text) > len(sent_text[i]) else ""
                new_tokens = len(out.token_ids) > sent_tokens[i]
                if not (delta or new_tokens or out.finished):
                    continue
                logprobs = self._generated_logprobs(out, sent_tokens[i], offsets[i] + len(sent_text[i]))
                sent_text[i] += delta
                sent_tokens[i] = len(out.token_ids)
                yield self._chunk(
                    [
                        {
                            "index": i,
                            "text": delta,
                            "logprobs": logprobs,
                            "finish_reason": out.finish_reason if out.finished else None,
                        }
                    ]
                )
        if self.body.include_usage:
            prompt_lens = [len(ids) for ids in self.prompts]
            yield self._chunk([], {"usage": usage(prompt_lens, [o for o in group.latest if o is not None])})
