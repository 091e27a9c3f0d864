"""OpenAI's Responses API (`POST /v1/responses`): the request body and what the server
sends back, as pydantic models for validation and for /openapi.json.

Only the stateless subset: nothing is stored (`store` is answered false), so
`previous_response_id` cannot be served. The body is translated into a chat request
(server/responses_api.py), so everything chat validates is validated the same way."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from headwise.engine.sampling_params import SEED_MAX, SEED_MIN
from headwise.server.protocol import CONTEXT_BOUND, MAX_TOOLS, FunctionName, Int, Text, _Body

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class InputText(BaseModel):
    """A text part of a message: `input_text` from the user, `output_text` from an earlier
    assistant turn (both carry `text`)."""

    model_config = _STRICT

    type: Literal["input_text", "output_text", "text"]
    text: Text


class MessageItem(BaseModel):
    model_config = _STRICT

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[InputText], Field(min_length=1)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """An earlier turn's tool call, sent back with its output in the next request."""

    model_config = _STRICT

    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text


class FunctionCallOutputItem(BaseModel):
    model_config = _STRICT

    type: Literal["function_call_output"]
    call_id: Text
    output: Text


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(union_mode="left_to_right")]
_ONLY_NULL = WithJsonSchema({"type": "null"})


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON following `schema` (chat's
    `response_format`, through the same grammar path)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", populate_by_name=True)

    type: Literal["text", "json_schema", "json_object"]
    name: Text | None = None
    description: Text | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> dict | None:
        """Chat's `response_format` for this format; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec = {"name": self.name or "response", "schema": self.schema_, "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


class TextOptions(BaseModel):
    model_config = _STRICT

    format: TextFormat | None = None


class FunctionTool(BaseModel):
    """A Responses function tool: chat's function definition, flattened."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    type: Literal["function"]
    name: FunctionName
    description: Text | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    type: Literal["function"]
    name: FunctionName


class ResponsesRequest(_Body):
    model: Text | None = None
    input: Annotated[Text, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: Int(ge=1, json_schema_extra={CONTEXT_BOUND: True}) | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Int(ge=SEED_MIN, le=SEED_MAX) | None = None  # vLLM's extension, as in chat
    stream: bool = False
    store: bool = False  # accepted; nothing is ever stored, and the response says so
    previous_response_id: Annotated[Text | None, _ONLY_NULL] = None  # stateless: any value is a 400 naming it
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    text: TextOptions | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Text] | None = None
    user: Text | None = None
    kv_plan: Text | None = None  # headwise: as in chat


# -- what the server sends ------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str = Field(description="what a function_call_output item answering it names")
    name: str
    arguments: str = Field(description="the arguments as JSON text")
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="input tokens served from the prefix cache")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int
    kv_bytes: int = Field(description="headwise: the peak KV cache bytes the request held")
    kv_bytes_decode: int = Field(description="headwise: the KV cache bytes it held once its prompt was processed")


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "cancelled", "failed"]
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    usage: ResponseUsage | None
    incomplete_details: IncompleteDetails | None
    error: dict | None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    tools: list[dict]
    tool_choice: str | dict
    parallel_tool_calls: bool
    text: dict
    store: bool
    previous_response_id: None
    metadata: dict


class ResponseStreamEvent(BaseModel):
    """One event of a `stream: true` response; `type` is also the SSE `event:` name
    (response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta, response.output_text.done,
    response.content_part.done, response.output_item.done, then response.completed or
    response.incomplete; or `error`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
