"""Which JSON-schema keywords the grammar backend (xgrammar 0.2.8) enforces.

xgrammar drops keywords it cannot turn into a grammar (`not`, `allOf`, `uniqueItems`,
`multipleOf` on numbers, unknown formats, `oneOf`'s exclusivity) with at most a log
line, which would let through output the schema forbids. A schema is checked against the
set below (each entry verified to reject a violating document) and any other keyword is
an InvalidRequest naming it and where it is: never silently loosened."""

from __future__ import annotations

from headwise.engine.sampling_params import InvalidRequest

# keywords with no effect on which documents validate
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # OpenAPI's hint for a oneOf; the branches' consts do the work
        "nullable",  # OpenAPI: ignoring it forbids null, which only tightens
        "strict",
    }
)
ENFORCED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "maxProperties",
        "minProperties",
        "dependentRequired",
        "unevaluatedProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "contains",
        "anyOf",
        "oneOf",  # only with mutually exclusive branches: _check_one_of
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",  # integers only
    }
)
FORMATS = frozenset(
    {
        "email",
        "uri",
        "uri-reference",
        "uri-template",
        "date",
        "time",
        "date-time",
        "duration",
        "uuid",
        "ipv4",
        "ipv6",
        "hostname",
        "json-pointer",
        "relative-json-pointer",
    }
)
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("additionalProperties", "propertyNames", "unevaluatedProperties", "items", "contains")


def check_enforceable(schema: object, param: str) -> None:
    """InvalidRequest unless every keyword of `schema` is enforced or an annotation."""
    _check(schema, param, "#")


def _fail(param: str, where: str, message: str) -> None:
    raise InvalidRequest(
        f"{param}: {message} at {where} (the grammar backend cannot enforce it)", param, "unsupported_schema"
    )


def _check(schema: object, param: str, where: str) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequest(
            f"{param}: a schema must be an object or a boolean at {where}, got {schema!r}", param, "invalid_grammar"
        )
    for key, value in schema.items():
        if key in ANNOTATIONS or (key == "uniqueItems" and value is False):
            continue
        if key not in ENFORCED:
            _fail(param, where, f"keyword {key!r} is not supported")
        if key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise InvalidRequest(f"{param}: {key} must be an object at {where}", param, "invalid_grammar")
            for name, sub in value.items():
                _check(sub, param, f"{where}/{key}/{name}")
        elif key in _SUBSCHEMAS:
            _check(value, param, f"{where}/{key}")
        elif key in ("anyOf", "oneOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise InvalidRequest(f"{param}: {key} must be a non-empty list at {where}", param, "invalid_grammar")
            for i, sub in enumerate(value):
                _check(sub, param, f"{where}/{key}/{i}")
            if key == "oneOf":
                _check_one_of(value, param, where)
        elif key == "format" and value not in FORMATS:
            _fail(param, where, f"format {value!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
        elif key == "multipleOf" and schema.get("type") != "integer":
            _fail(param, where, "multipleOf is enforced on integers only")


def _check_one_of(branches: list, param: str, where: str) -> None:
    """oneOf is enforced as anyOf, which is the same only when no document matches two
    branches: accepted when the branches declare disjoint types, or are objects told
    apart by a required property with a different const (a tagged union)."""
    types = [_types(b) for b in branches]
    if all(types) and sum(len(t) for t in types) == len(set().union(*types)):
        return
    tags = [_tags(b) for b in branches]
    common = set.intersection(*(set(t) for t in tags)) if all(tags) else set()
    for name in common:
        values = [t[name] for t in tags]
        if len({repr(v) for v in values}) == len(values):
            return
    _fail(param, where, "oneOf whose branches may overlap (it would be enforced as anyOf) is not supported")


def _types(branch: object) -> set[str]:
    if not isinstance(branch, dict) or "type" not in branch:
        return set()
    t = branch["type"]
    names = set(t if isinstance(t, list) else [t])
    # every integer is a number: they overlap
    return names | {"number"} if "integer" in names else names


def _tags(branch: object) -> dict[str, object]:
    if not isinstance(branch, dict):
        return {}
    required = set(branch.get("required", ()))
    out = {}
    for name, sub in (branch.get("properties") or {}).items():
        if name in required and isinstance(sub, dict):
            if "const" in sub:
                out[name] = sub["const"]
            elif isinstance(sub.get("enum"), list) and len(sub["enum"]) == 1:
                out[name] = sub["enum"][0]
    return out
