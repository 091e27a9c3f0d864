"""Response bodies as pydantic models: what /openapi.json documents for every route and
status. Handlers build plain dicts (one serialization, no second validation pass); the
fuzz test (tests/test_server_fuzz.py) checks real responses against these schemas."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ErrorBody(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, not_found_error, "
        "rate_limit_error, server_error or service_unavailable_error"
    )
    param: str | None = Field(description="the request field at fault, dotted (`messages.0.role`)")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object; every 4xx and 5xx except /health's 503 carries it."""

    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="prompt tokens served from the prefix cache (per prompt, the smallest hit among its choices)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    kv_bytes: int = Field(description="headwise: the peak KV cache bytes each choice held, summed")
    kv_bytes_decode: int = Field(
        description="headwise: the KV cache bytes each choice held once its prompt was processed, summed"
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One event of a completions stream; the last one (with `include_usage`) has no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message is only tool calls")
    tool_calls: list[ToolCallOut] | None = None


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    """A streamed call: its first delta has id, type and name (arguments ""), the next ones
    fragments of its arguments, all with the call's index."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int
    kv_plans: list[str]
    default_kv_plan: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    """200 with `ok`; 503 while `loading`, after a load `error`, while `draining` on SIGTERM,
    and once the engine is `dead` (the process then exits)."""

    status: Literal["ok", "loading", "error", "draining", "dead"]
    message: str | None = None
