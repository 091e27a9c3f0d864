"""What a request's output must match: one grammar source, named by its kind.

The kinds are vLLM's `structured_outputs` keys plus `json_object` (any JSON object) and
`structural_tag` (xgrammar's free text with constrained tagged regions, for tool calls).
The spec is hashable: compiled grammars are cached by it (engine/structured_output.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from headwise.engine.json_schema_support import check_enforceable
from headwise.engine.sampling_params import InvalidRequest

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    source: str  # JSON schema text, regex, EBNF, a JSON list of choices, a structural tag as JSON
    param: str = field(default="structured_outputs", compare=False)  # the request field an error names

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}", self.param)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source


def json_schema_spec(schema: dict | bool, param: str) -> GrammarSpec:
    """A JSON-schema grammar; keywords the backend cannot enforce are an InvalidRequest."""
    check_enforceable(schema, param)
    return GrammarSpec("json", json.dumps(schema, separators=(",", ":")), param)


def choice_spec(choices: list[str], param: str) -> GrammarSpec:
    if not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidRequest(f"{param} must be a non-empty list of strings, got {choices!r}", param)
    return GrammarSpec("choice", json.dumps(choices, ensure_ascii=False), param)


def choice_ebnf(source: str) -> str:
    """EBNF for exactly one of the choices (EBNF string literals take JSON's escapes)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in json.loads(source))
