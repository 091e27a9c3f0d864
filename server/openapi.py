"""/openapi.json as the server really behaves: each route lists the statuses it sends with
the OpenAI error object's schema, generation routes document their event stream, and
FastAPI's automatic 422 (this server answers validation errors with 400) is removed."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from headwise.server.responses import ErrorResponse

_WHY = {
    400: "Invalid request: a field of the wrong type or out of range, invalid JSON or Unicode, token ids "
    "outside the vocabulary, or a prompt longer than the context.",
    401: "Missing or wrong API key (only when the server runs with --api-key).",
    404: "Unknown model or kv_plan.",
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


def install_openapi(app: FastAPI, requests: list[type[BaseModel]], responses: list[type[BaseModel]]) -> None:
    """Replace app.openapi with one that documents 413 everywhere (the body limit guards
    every route) and drops 422. The component schemas are pydantic's own for `requests`
    (validation) and `responses` (serialization, the stream chunks included): FastAPI's
    round trip through its OpenAPI model turns integer bounds into floats, and 2**63 - 1
    does not survive that."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                documented = operation.setdefault("responses", {})
                documented.pop("422", None)
                documented.setdefault(
                    "413",
                    {
                        "description": _WHY[413],
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
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
