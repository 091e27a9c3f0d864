"""Schemathesis over the server's own /openapi.json, in process through ASGI (no network),
on the tiny model with a 32-token context (cheap generations, many context errors), with
every check schemathesis has: each generated request gets a status the document lists
(never a 5xx) and a body matching the schema for that status, event streams included;
a request the document allows is accepted and one it forbids is refused; an undocumented
method gets 405 with `Allow`.

One kind of refusal of schema-valid data is allowed, because JSON Schema cannot state
it: limits on a sum or product of fields (prompt tokens + max_tokens within the
context, prompts x n within --max-prompts-per-request and --max-queue) and vLLM's rule
that continue_final_message and add_generation_prompt are not both true, best_of
equal to n, and grammars, regexes and schemas that do not compile or use keywords the
backend cannot enforce. Each such 400
carries its own code, and only those codes are let through."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.app import create_app
from headwise.server.openapi import apply_bounds
from headwise.server.protocol import CONTEXT_BOUND, PROMPTS_BOUND, VOCAB_BOUND
from headwise.server.settings import ServerSettings
from tests.tiny_model import VOCAB, add_chat_template, write_tiny_llama

MAX_MODEL_LEN = 32
# the 400s for limits across fields, which no schema keyword can express
CROSS_FIELD_CODES = {"context_length_exceeded", "exceeds_max_queue", "too_many_prompts", "conflicting_parameters"}
CROSS_FIELD_PARAMS = {("unsupported_parameter", "best_of")}  # best_of must equal n
# a grammar, regex or schema is a string or object to JSON Schema, but whether it compiles
# (and which schema keywords the grammar backend can enforce) is a language's rule
CROSS_FIELD_CODES |= {"invalid_grammar", "unsupported_schema"}
# a non-empty string the tokenizer turns into no token at all (the tiny model's vocabulary
# has no piece for "\u00a0"): a property of the tokenizer, not of the JSON
CROSS_FIELD_CODES |= {"empty_prompt"}
# per operation; eight operations. The default suite runs a bounded random pass; `-m slow`
# adds schemathesis' coverage phase (boundary and negative values of every field, a few
# hundred cases per generation route) to a longer random pass
FAST_EXAMPLES = 25
DEEP_EXAMPLES = 120
REQUEST_TIMEOUT_S = 120  # a 2-core machine shared with other jobs can be slow; a hang still fails


_MODEL_DIR: list[str] = []  # filled by the `running` fixture before the app loads its engine
SEEN: Counter[tuple[str, int]] = Counter()  # (operation, status) of every generated request


def _load_tiny() -> LLMEngine:
    config = EngineConfig(model=_MODEL_DIR[-1], kv_cache_mb=8, max_model_len=MAX_MODEL_LEN, max_num_seqs=16)
    return LLMEngine(config)


# a queue cap keeps a generated batch of prompts x n choices from running for minutes
SETTINGS = ServerSettings(max_queue=16)
APP = create_app(SETTINGS, _load_tiny)
# what /openapi.json says once the tiny model has loaded (test_the_fuzzed_document_is_the_served_one)
BOUNDS = {VOCAB_BOUND: VOCAB - 1, CONTEXT_BOUND: MAX_MODEL_LEN, PROMPTS_BOUND: SETTINGS.max_prompts_per_request}


def _document() -> dict:
    document = APP.openapi()  # the model is not loaded yet: without its bounds, and not cached
    apply_bounds(document, BOUNDS)
    return document


DOCUMENT = _document()


def accepts_valid_data_or_a_cross_field_limit(ctx, response, case):
    """schemathesis' positive_data_acceptance, except for the CROSS_FIELD_CODES 400s."""
    if response.status_code == 400:
        error = response.json()["error"]
        if error["code"] in CROSS_FIELD_CODES or (error["code"], error["param"]) in CROSS_FIELD_PARAMS:
            return None
    return positive_data_acceptance(ctx, response, case)


async def _without_lifespan(scope, receive, send) -> None:
    """APP minus its lifespan, which the `running` fixture owns: schemathesis' pytest plugin
    ends an app's lifespan after every test item, which would reload the engine (and answer
    503 while it loads) for each operation."""
    if scope["type"] == "lifespan":
        raise RuntimeError("the test fixture runs the lifespan")  # refused before any message: "no lifespan"
    await APP(scope, receive, send)


def _schema(coverage: bool) -> schemathesis.BaseSchema:
    """The document is built at import with the tiny model's bounds (schemathesis'
    fixture-based loader does not run under pytest 9); requests go to APP in process."""
    config = schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": coverage}}})
    loaded = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT), config=config)
    loaded.app = _without_lifespan
    return loaded


fast_schema = _schema(coverage=False)
deep_schema = _schema(coverage=True)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """APP's state with the engine loaded and its worker running; shut down at the end."""
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    add_chat_template(model_dir)
    _MODEL_DIR.append(model_dir)
    state = APP.state.headwise
    asyncio.run(state.load())
    assert state.ready, state.load_error
    yield state
    asyncio.run(state.shutdown())
    # the one-line summary per operation (shown with -s): how many requests, which statuses
    for label in sorted({label for label, _ in SEEN}):
        statuses = {status: n for (op, status), n in sorted(SEEN.items()) if op == label}
        print(f"fuzz: {label}: {sum(statuses.values())} requests, statuses {statuses}")


def assert_engine_clean(state) -> None:
    """Every block back and nothing in flight once the response is out (aborts of a closed
    request reach the engine worker a step later, hence the short wait)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = state.engine.stats()
        if stats.num_free_blocks == stats.num_blocks and state.async_engine.num_unfinished == 0:
            break
        time.sleep(0.01)
    assert stats.num_free_blocks == stats.num_blocks, stats
    assert state.admission.in_flight == 0
    assert state.ready


def test_the_fuzzed_document_is_the_served_one(running):
    APP.openapi_schema = None
    served = APP.openapi()
    assert served is not DOCUMENT and served == DOCUMENT
    assert served["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == VOCAB - 1


@fast_schema.parametrize()
@settings(max_examples=FAST_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_2xx_or_4xx(case, running):
    response = case.call_and_validate(
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepts_valid_data_or_a_cross_field_limit],
        timeout=REQUEST_TIMEOUT_S,
    )
    SEEN[case.operation.label, response.status_code] += 1
    assert_engine_clean(running)


@pytest.mark.slow
@deep_schema.parametrize()
@settings(max_examples=DEEP_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_2xx_or_4xx_deep(case, running):
    response = case.call_and_validate(
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepts_valid_data_or_a_cross_field_limit],
        timeout=REQUEST_TIMEOUT_S,
    )
    SEEN[case.operation.label, response.status_code] += 1
    assert_engine_clean(running)
