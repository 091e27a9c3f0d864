"""OpenAI request bodies (pydantic), plus headwise's `kv_plan`. Unknown fields are kept in
`model_extra`, where server/field_policy.py accepts those without effect on the output and
rejects the rest with a 400 naming them (nothing is silently ignored).

Validation is strict where OpenAI is: no coercion (`"stream": "yes"` and `"n": "2"` are
400s, not true and 2), finite numbers only (`Infinity` / `NaN` are 400s), OpenAI's ranges
(`temperature` in [0, 2], `top_p` in (0, 1]), seeds as signed 64-bit integers, and text
that is valid Unicode: a lone surrogate (`"\\ud800"`, which JSON can carry but UTF-8
cannot) is a 400 naming the field, never a tokenizer crash."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from headwise.engine.sampling_params import REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, SEED_MAX, SEED_MIN

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


def _whole(value: object) -> object:
    """24.0 is the integer 24: JSON Schema's `integer` includes whole floats, so the
    document promises them; strings and 24.5 still fail the strict check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# markers the OpenAPI document replaces with the loaded model's numbers (server/openapi.py)
VOCAB_BOUND = "x-headwise-token-id"  # maximum: vocabulary size - 1
CONTEXT_BOUND = "x-headwise-max-model-len"  # maximum: max_model_len
PROMPTS_BOUND = "x-headwise-max-prompts"  # maxItems: --max-prompts-per-request
TOKEN_KEY_BOUND = "x-headwise-token-id-key"  # pattern: a token id below the vocabulary size, as text
TOKEN_KEY = r"^(0|[1-9][0-9]*)$"  # before the model's bound is known
MAX_STOP_STRINGS = 32  # each one is searched for in every new piece of text
MAX_STOP_LENGTH = 1024  # characters
MAX_TOOLS = 128  # OpenAI's limit on a request's tools


def Int(**field) -> object:  # noqa: N802  (a type, spelled like one)
    """An integer field with pydantic `Field(**field)` bounds that also takes a whole float.
    The bounds go inside the validator so the document states them as minimum / maximum."""
    return Annotated[int, Field(**field), BeforeValidator(_whole)]


Text = Annotated[str, AfterValidator(_valid_unicode)]
PromptText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]  # "" has no token to start from
TokenId = Int(ge=0, json_schema_extra={VOCAB_BOUND: True})
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = (
    PromptText
    | TokenIds
    | Annotated[list[PromptText], Field(min_length=1, json_schema_extra={PROMPTS_BOUND: True})]
    | Annotated[list[TokenIds], Field(min_length=1, json_schema_extra={PROMPTS_BOUND: True})]
)
OutputTokens = Int(ge=1, json_schema_extra={CONTEXT_BOUND: True})
StopText = Annotated[str, Field(max_length=MAX_STOP_LENGTH), AfterValidator(_valid_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", **_STRICT)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, **_STRICT)

    name: Text
    description: Text | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid", **_STRICT)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", **_STRICT)

    json_: dict[str, Any] | bool | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    structural_tag: Text | dict[str, Any] | None = None


class GenerationRequest(_Body):
    """Fields both generation endpoints share (OpenAI names, vLLM extensions)."""

    model: Text | None = None
    max_tokens: OutputTokens | None = None
    max_completion_tokens: OutputTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Int(ge=-1) | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Int(ge=SEED_MIN, le=SEED_MAX) | None = None
    n: Int(ge=1, le=64) = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)] | None = None
    ignore_eos: bool = False
    min_tokens: Int(ge=0) = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    kv_plan: Text | None = None  # headwise: a plan loaded with --plan; default: the server's
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100, le=100)]],
            Field(json_schema_extra={"propertyNames": {"pattern": TOKEN_KEY, TOKEN_KEY_BOUND: True}}),
        ]
        | None
    ) = None  # token id (as text) -> bias
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' fields
    guided_json: dict[str, Any] | bool | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: Text | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None  # only best_of == n (no extra candidates)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    echo: bool = False
    logprobs: Int(ge=0, le=20) | None = None
    suffix: None = None  # not supported: any value fails validation with a clear message


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for tool names


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no arguments
    strict: bool | None = None  # the arguments always follow `parameters` here, strict or not


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    type: Literal["function"]
    function: ToolChoiceFunction


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    name: Text
    arguments: Text  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", **_STRICT)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: Text | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the last message stays open and is continued
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # OpenAI's default: true


class TokenizeRequest(_Body):
    """Exactly one of `prompt` and `messages`, as the document says (neither is nullable)."""

    model_config = ConfigDict(
        extra="allow", **_STRICT, json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
    )

    model: Text | None = None
    prompt: Text = None  # type: ignore[assignment]  # absent, never null
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = None  # type: ignore[assignment]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None  # rendered as chat would


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[TokenId]
