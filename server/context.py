"""What both generation endpoints do around the engine: checks, ids, running the group with
disconnect handling, and wrapping chunks as SSE with in-stream errors."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from headwise.engine.outputs import RequestOutput
from headwise.server.errors import APIError, api_error
from headwise.server.field_policy import check_fields
from headwise.server.generation import GenerationGroup, Job
from headwise.server.protocol import GenerationRequest
from headwise.server.state import ServerState
from headwise.server.streaming import DONE, Disconnected, SSEResponse, cancel_on_disconnect, sse

log = logging.getLogger(__name__)

# status for a client that left; it is never delivered, only logged (nginx's convention)
CLIENT_CLOSED = 499


class RequestContext:
    """One generation request: the engine, the response id, and the checks done up front."""

    def __init__(self, request: Request, body: GenerationRequest, prefix: str) -> None:
        self.request = request
        self.state: ServerState = request.app.state.headwise
        self.engine, self.async_engine = self.state.require_engine()
        self.state.check_accepting()
        self.state.check_model(body.model)
        self.state.check_plan(body.kv_plan)
        self.body = body
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = self.state.model_name
        accepted = check_fields(body)
        if accepted:
            log.info("%s: accepted fields without effect on the output: %s", self.id, ", ".join(accepted))
        log.debug("%s: X-Request-Id %s", self.id, request.state.request_id)

    def check_fits(self, count: int) -> None:
        """Before any tokenizing: `count` engine requests (prompts x n) within
        --max-prompts-per-request (400) and --max-queue (400 if never, 429 if not now)."""
        limit = self.state.settings.max_prompts_per_request
        if count > limit:
            raise APIError(
                400,
                f"this request asks for {count} generations (prompts x n); --max-prompts-per-request is {limit}",
                "prompt" if self.body.n == 1 else "n",
                "too_many_prompts",
            )
        self.state.admission.check(count)

    def group(self, jobs: list[Job]) -> GenerationGroup:
        for job in jobs:
            # the engine checks this too; checked here, an over-long prompt (a 4 MB one is a
            # million tokens) never travels to the engine thread, whose passes over it hold the GIL
            self.engine.check_context(len(job.prompt_ids), job.params.max_tokens)
        return GenerationGroup(self.async_engine, jobs, self.body.kv_plan, self.state.metrics, self.state.admission)

    def job_id(self, index: int) -> str:
        return f"{self.id}-{index}"

    async def collect(self, group: GenerationGroup) -> list[RequestOutput] | Response:
        """Every final output, or an undelivered 499 response if the client left."""
        try:
            return await cancel_on_disconnect(self.request, group.collect())
        except Disconnected:
            log.info("%s: client disconnected; request aborted", self.id)
            return Response(status_code=CLIENT_CLOSED)

    async def stream(
        self,
        group: GenerationGroup,
        chunks: Callable[[GenerationGroup], AsyncIterator[dict]],
        frame: Callable[[dict], str] = sse,
        error_payload: Callable[[APIError], dict] = APIError.body,
        done: str | None = DONE,
    ) -> Response:
        """Start the group (errors before the first token are plain HTTP errors), then stream
        `chunks` as SSE (`frame` each); a later error is sent as `error_payload` followed by
        `done` ([DONE]; the Responses API has none)."""
        try:
            await cancel_on_disconnect(self.request, group.start())
        except Disconnected:
            await group.close()
            log.info("%s: client disconnected before the first token; request aborted", self.id)
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            await group.close()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                async for payload in chunks(group):
                    yield frame(payload)
            except Exception as e:
                yield frame(error_payload(api_error(e)))
            if done is not None:
                yield done

        return SSEResponse(events(), cleanup=group.close)


def usage(prompt_lens: list[int], outputs: list[RequestOutput]) -> dict:
    """OpenAI usage for prompts of `prompt_lens` whose choices are `outputs`, prompt-major
    (each prompt's n choices in a row). Prompt tokens count once per prompt, and so do
    `prompt_tokens_details.cached_tokens`: the prompt tokens that none of its choices
    computed, i.e. the smallest prefix-cache hit among them. headwise adds `kv_bytes` (the
    peak KV bytes each choice held) and `kv_bytes_decode` (what each held once its prompt
    was processed: the two differ under a select plan), summed over choices."""
    n = max(1, len(outputs) // max(1, len(prompt_lens)))
    cached = sum(
        min((out.num_cached_tokens for out in outputs[p * n : (p + 1) * n]), default=0) for p in range(len(prompt_lens))
    )
    completion = sum(len(out.token_ids) for out in outputs)
    prompt = sum(prompt_lens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "kv_bytes": sum(out.kv_bytes for out in outputs),
        "kv_bytes_decode": sum(out.kv_bytes_decode for out in outputs),
    }
