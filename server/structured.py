"""A request's output constraint (response_format, vLLM's structured_outputs and guided_*) as
the engine's GrammarSpec; reused by every endpoint that takes one (chat, completions, and
/v1/responses' `text.format`)."""

from __future__ import annotations

import asyncio
import json

from headwise.engine.grammar_spec import GrammarSpec, choice_spec, json_schema_spec
from headwise.engine.sampling_params import InvalidRequest
from headwise.engine.structured_output import GrammarCompiler
from headwise.server.protocol import GenerationRequest, ResponseFormat, StructuredOutputs


def response_format_grammar(fmt: ResponseFormat | None, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI's response_format: `text` is no constraint; `json_object` any JSON object;
    `json_schema` its schema (strict or not: either way the schema is enforced)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object", "", param)
    if fmt.json_schema is None:
        raise InvalidRequest(
            f"{param}.json_schema is required when {param}.type is 'json_schema'", param, "conflicting_parameters"
        )
    schema = fmt.json_schema.schema_
    where = f"{param}.json_schema.schema" if param == "response_format" else f"{param}.schema"
    return json_schema_spec(True if schema is None else schema, where)


def structured_outputs_grammar(so: StructuredOutputs, param: str = "structured_outputs") -> GrammarSpec:
    given = [name for name, value in so.model_dump(by_alias=True).items() if value not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(
            f"{param} must set exactly one of json, regex, choice, grammar, json_object, structural_tag; "
            f"got {given or 'none'}",
            param,
            "conflicting_parameters",
        )
    kind = given[0]
    if kind == "json":
        return json_schema_spec(_schema(so.json_, f"{param}.json"), f"{param}.json")
    if kind == "choice":
        return choice_spec(so.choice, f"{param}.choice")
    if kind == "json_object":
        return GrammarSpec("json_object", "", f"{param}.json_object")
    if kind == "structural_tag":
        tag = so.structural_tag
        return GrammarSpec("structural_tag", tag if isinstance(tag, str) else json.dumps(tag), f"{param}.{kind}")
    return GrammarSpec(kind, getattr(so, kind), f"{param}.{kind}")


def request_grammar(body: GenerationRequest) -> GrammarSpec | None:
    """The one output constraint of `body`, if any; two at once are a 400 naming both."""
    found: list[tuple[str, GrammarSpec]] = []
    spec = response_format_grammar(body.response_format)
    if spec is not None:
        found.append(("response_format", spec))
    if body.structured_outputs is not None:
        found.append(("structured_outputs", structured_outputs_grammar(body.structured_outputs)))
    if body.guided_json is not None:
        found.append(("guided_json", json_schema_spec(_schema(body.guided_json, "guided_json"), "guided_json")))
    if body.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", body.guided_regex, "guided_regex")))
    if body.guided_choice is not None:
        found.append(("guided_choice", choice_spec(body.guided_choice, "guided_choice")))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("grammar", body.guided_grammar, "guided_grammar")))
    if len(found) > 1:
        names = [name for name, _ in found]
        raise InvalidRequest(
            f"only one output constraint may be given, got {', '.join(names)}", names[1], "conflicting_parameters"
        )
    return found[0][1] if found else None


async def check_compiles(compiler: GrammarCompiler, spec: GrammarSpec | None) -> None:
    """Compile `spec` now (cached for the engine, which then starts at once); a grammar that
    does not compile raises InvalidRequest naming its field, before any response is sent."""
    if spec is not None:
        await asyncio.wrap_future(compiler.compile(spec))


def _schema(value: dict | bool | str, param: str) -> dict | bool:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{param} is not valid JSON: {e}", param, "invalid_grammar") from None
