"""POST /tokenize and /detokenize (vLLM's shapes): text or chat messages to ids and back."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from headwise.server.auth import require_api_key
from headwise.server.chat import template_messages
from headwise.server.errors import APIError
from headwise.server.protocol import DetokenizeRequest, TokenizeRequest
from headwise.server.state import ServerState

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(require_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state: ServerState = request.app.state.headwise
    engine, _ = state.require_engine()
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of `prompt` (text) or `messages` (chat)", "prompt", "invalid_value")
    if body.messages is not None:
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages", "invalid_value")
        tokens = engine.encode_chat(template_messages(body.messages), add_generation_prompt=body.add_generation_prompt)
    else:
        tokens = engine.tokenizer.encode(body.prompt)
    return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}


@router.post("/detokenize", dependencies=[Depends(require_api_key)])
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state: ServerState = request.app.state.headwise
    engine, _ = state.require_engine()
    state.check_model(body.model)
    vocab = len(engine.tokenizer)
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise APIError(400, f"token ids must be < {vocab} (the vocabulary size), got {bad[:5]}", "tokens",
                       "invalid_value")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
