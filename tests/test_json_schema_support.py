"""Schemas are checked against the keywords the grammar backend enforces (no model needed)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from headwise.engine.json_schema_support import check_enforceable
from headwise.engine.sampling_params import InvalidRequest


class Address(BaseModel):
    street: str
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    home: Address


@pytest.mark.parametrize(
    "schema",
    [
        Person.model_json_schema(),
        {"type": "object", "properties": {"a": {"type": "string", "format": "date-time", "pattern": "^2"}}},
        {"type": "array", "items": {"type": "integer", "multipleOf": 5}, "minItems": 1, "uniqueItems": False},
        {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        {
            "oneOf": [
                {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
                {"type": "object", "properties": {"kind": {"enum": ["b"]}}, "required": ["kind"]},
            ]
        },
        True,
    ],
)
def test_enforceable_schemas_pass(schema):
    check_enforceable(schema, "response_format")


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"not": {"type": "string"}}, "keyword 'not' is not supported at #"),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "keyword 'allOf' is not supported at #"),
        (
            {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}},
            "'uniqueItems' is not supported at #/properties/t",
        ),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf is enforced on integers only at #"),
        ({"type": "string", "format": "iri"}, "format 'iri' is not supported"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf whose branches may overlap"),
        ({"$defs": {"x": {"if": {"type": "string"}}}}, "keyword 'if' is not supported at #/$defs/x"),
        ({"type": "object", "properties": []}, "properties must be an object at #"),
    ],
)
def test_unenforceable_keywords_are_invalid_requests_naming_the_place(schema, words):
    with pytest.raises(InvalidRequest) as info:
        check_enforceable(schema, "response_format.json_schema.schema")
    assert words in str(info.value)
    assert info.value.param == "response_format.json_schema.schema"
