"""POST /tokenize and /detokenize (vLLM's shapes): text or chat messages to ids and back."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from headwise.server.chat import check_prefill, template_messages
from headwise.server.errors import APIError
from headwise.server.field_policy import check_message_fields
from headwise.server.openapi import errors
from headwise.server.protocol import DetokenizeRequest, TokenizeRequest
from headwise.server.responses import DetokenizeResponse, TokenizeResponse
from headwise.server.state import ServerState

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 401, 404, 500, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    state: ServerState = request.app.state.headwise
    engine, _ = state.require_engine()
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of `prompt` (text) or `messages` (chat)", "prompt", "invalid_value")
    if body.messages is not None:
        check_prefill(body.add_generation_prompt, body.continue_final_message)
        check_message_fields(body.messages)
        tokens = await state.tokenizer_thread.run(
            engine.encode_chat,
            template_messages(body.messages),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            chat_template=state.settings.chat_template_text,
        )
    else:
        tokens = await state.tokenizer_thread.run(engine.tokenizer.encode, body.prompt)
    return JSONResponse({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens})


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 401, 404, 500, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    state: ServerState = request.app.state.headwise
    engine, _ = state.require_engine()
    state.check_model(body.model)
    vocab = len(engine.tokenizer)
    bad = [t for t in body.tokens if t >= vocab]  # the document states this bound too
    if bad:
        raise APIError(
            400, f"token ids must be < {vocab} (the vocabulary size), got {bad[:5]}", "tokens", "invalid_value"
        )
    return JSONResponse({"prompt": await state.tokenizer_thread.run(engine.tokenizer.decode, body.tokens)})
