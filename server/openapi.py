"""/openapi.json as the server really behaves: each route lists the statuses it sends with
the OpenAI error object's schema, generation routes document their event stream, and
FastAPI's automatic 422 (this server answers validation errors with 400) is removed."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from headwise.server.field_policy import document_fields
from headwise.server.protocol import CONTEXT_BOUND, PROMPTS_BOUND, TOKEN_KEY_BOUND, VOCAB_BOUND
from headwise.server.responses import ErrorResponse

_WHY = {
    400: "Invalid request: a field of the wrong type or out of range, invalid JSON or Unicode, token ids "
    "outside the vocabulary, a prompt longer than the context, more prompts x n than "
    "--max-prompts-per-request, or more than --max-queue could ever admit.",
    401: "Missing or wrong API key (only when the server runs with --api-key).",
    404: "Unknown model or kv_plan.",
    408: "The request body did not arrive within --body-timeout.",
    413: "The request body is larger than --max-request-bytes.",
    429: "--max-queue requests are already in flight; retry later.",
    500: "The engine failed this request (other requests go on), or the engine died (the server then "
    "exits). A stream that has started gets an error event and [DONE] instead.",
    503: "The model is loading or failed to load, the server is draining after SIGTERM, or the engine died.",
}
_FASTAPI_422 = ("HTTPValidationError", "ValidationError")
_REF = "#/components/schemas/{model}"


def errors(*statuses: int) -> dict[int | str, dict]:
    """`responses=` entries for the error statuses a route sends."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in statuses}


def event_stream(chunk: type[BaseModel]) -> dict[int | str, dict]:
    """The 200 of a route that streams when the body says `"stream": true`: SSE events whose
    data is a `chunk`, an error object (a failure after the stream began), then [DONE]."""
    data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {
            "anyOf": [{"$ref": _REF.format(model=chunk.__name__)}, {"$ref": _REF.format(model=ErrorResponse.__name__)}]
        },
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}
    return {
        200: {
            "description": f"JSON, or with `stream: true` an event stream of {chunk.__name__} "
            "events ending in `data: [DONE]`",
            "content": {"text/event-stream": {"schema": event}},
        }
    }


# marker -> the JSON Schema keyword its number goes into
_BOUND_KEYWORD = {VOCAB_BOUND: "maximum", CONTEXT_BOUND: "maximum", PROMPTS_BOUND: "maxItems"}


def at_most(n: int) -> str:
    """A regex for the decimal numbers 0..n written without leading zeros."""
    digits = str(n)
    alternatives = ["0"] + [f"[1-9][0-9]{{{k - 1}}}" for k in range(1, len(digits))]
    for i, d in enumerate(digits):
        low = 1 if i == 0 else 0
        if int(d) > low:
            alternatives.append(f"{digits[:i]}[{low}-{int(d) - 1}][0-9]{{{len(digits) - i - 1}}}")
    alternatives.append(digits)
    return "^(" + "|".join(alternatives) + ")$"


def apply_bounds(node: object, bounds: dict[str, int]) -> None:
    """Write each marked schema's bound (vocabulary, context, prompts per request) in place."""
    if isinstance(node, dict):
        for marker, keyword in _BOUND_KEYWORD.items():
            if node.get(marker) is True:
                node[keyword] = bounds[marker]
        if node.get(TOKEN_KEY_BOUND) is True:
            node["pattern"] = at_most(bounds[VOCAB_BOUND])
        for value in node.values():
            apply_bounds(value, bounds)
    elif isinstance(node, list):
        for value in node:
            apply_bounds(value, bounds)


def install_openapi(
    app: FastAPI,
    bounds: Callable[[], dict[str, int] | None],
    requests: list[type[BaseModel]],
    responses: list[type[BaseModel]],
) -> None:
    """Replace app.openapi with one that documents 413 everywhere (the body limit guards
    every route) and drops 422. The component schemas are pydantic's own for `requests`
    (validation) and `responses` (serialization, the stream chunks included): FastAPI's
    round trip through its OpenAPI model turns integer bounds into floats, and 2**63 - 1
    does not survive that. `bounds()` gives the loaded model's limits (token ids below the
    vocabulary size, max_tokens within the context, prompts per request), so the document
    allows nothing the server refuses for those; before the model loads it has none and is
    not cached."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        numbers = bounds()
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                documented = operation.setdefault("responses", {})
                documented.pop("422", None)
                for status in (408, 413):  # the body's limits guard every route
                    documented.setdefault(
                        str(status),
                        {
                            "description": _WHY[status],
                            "content": {
                                "application/json": {"schema": {"$ref": _REF.format(model=ErrorResponse.__name__)}}
                            },
                        },
                    )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in _FASTAPI_422:
            components.pop(name, None)
        modes = [(m, "validation") for m in requests] + [(m, "serialization") for m in responses]
        _, defs = models_json_schema(modes, ref_template=_REF)
        components.update(defs.get("$defs", {}))
        document_fields(components)
        if numbers is None:
            return schema
        apply_bounds(schema, numbers)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
