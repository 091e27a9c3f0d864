"""OpenAI request bodies (pydantic), plus headwise's `kv_plan`. Unknown fields are kept in
`model_extra` so the handler can log them instead of failing the request.

Validation is strict where OpenAI is: no coercion (`"stream": "yes"` and `"n": "2"` are
400s, not true and 2), finite numbers only (`Infinity` / `NaN` are 400s), OpenAI's ranges
(`temperature` in [0, 2], `top_p` in (0, 1]), seeds as signed 64-bit integers, and text
that is valid Unicode: a lone surrogate (`"\\ud800"`, which JSON can carry but UTF-8
cannot) is a 400 naming the field, never a tokenizer crash."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from headwise.engine.sampling_params import SEED_MAX, SEED_MIN

_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text must be valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at index "
            f"{e.start} cannot be encoded as UTF-8"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", **_STRICT)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class GenerationRequest(_Body):
    """Fields both generation endpoints share (OpenAI names, vLLM extensions)."""

    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    kv_plan: Text | None = None  # headwise: a plan loaded with --plan; default: the server's

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: None = None  # not supported: any value fails validation with a clear message


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", **_STRICT)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[TokenId]
