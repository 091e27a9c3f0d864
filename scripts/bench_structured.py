"""Structured outputs on the CPU: (1) correctness over generated JSON schemas (nested objects,
arrays, enums, patterns, optional and nullable fields): every output that ends with `stop`
must parse and validate with `jsonschema`; (2) decode ms/step at batch 16 with a json_schema
on every request vs none, same engine, alternating runs.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_structured.py --schemas 50 --tools 50 --repeats 3

(3) `tool_choice: required` over generated tool schemas: every call validates.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import jsonschema

from headwise.engine.config import EngineConfig
from headwise.engine.grammar_spec import json_schema_spec
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams

WORDS = ["city", "name", "color", "size", "owner", "price", "tags", "status", "code", "level", "note", "items"]


def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema mixing every kind the issue names."""
    props, required = {}, []
    for key in rng.sample(WORDS, rng.randint(2, 4)):
        kind = rng.choice(
            ["string", "integer", "enum", "pattern", "array", "nullable", "object" if depth < 1 else "bool"]
        )
        if kind == "string":
            sub = {"type": "string", "maxLength": rng.randint(5, 20)}
        elif kind == "integer":
            sub = {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 1000])}
        elif kind == "enum":
            sub = {"enum": rng.sample(["red", "green", "blue", "small", "large", "on", "off"], 3)}
        elif kind == "pattern":
            sub = {"type": "string", "pattern": rng.choice(["^[A-Z]{3}-[0-9]{2}$", "^[a-z]+$", "^[0-9]{4}$"])}
        elif kind == "array":
            sub = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}
        elif kind == "nullable":
            sub = {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        elif kind == "object":
            sub = make_schema(rng, depth + 1)
        else:
            sub = {"type": "boolean"}
        props[key] = sub
        if rng.random() < 0.7:
            required.append(key)
    return {"type": "object", "properties": props, "required": required}


def correctness(engine: LLMEngine, n: int, seed: int) -> None:
    rng = random.Random(seed)
    schemas = [make_schema(rng) for _ in range(n)]
    prompts = [
        engine.encode_chat([{"role": "user", "content": f"Fill in this JSON object: {', '.join(s['properties'])}."}])
        for s in schemas
    ]
    params = [
        SamplingParams(max_tokens=120, temperature=0.7, seed=i, grammar=json_schema_spec(s, "schema"))
        for i, s in enumerate(schemas)
    ]
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    stopped = [(o, s) for o, s in zip(outs, schemas) if o.finish_reason == "stop"]
    valid = 0
    for out, schema in stopped:
        try:
            jsonschema.validate(json.loads(out.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            print("INVALID:", out.text, e)
    print(
        f"correctness: {n} schemas, {len(stopped)} ended with stop, {valid}/{len(stopped)} of those parse and "
        f"validate, {n - len(stopped)} cut by max_tokens=120; {time.perf_counter() - t:.1f} s"
    )


def tool_calls(engine: LLMEngine, n: int, seed: int) -> None:
    """tool_choice required over `n` requests, each with two tools whose parameters are
    generated schemas: every output that ends with `stop` must be calls (hermes format) of
    those tools whose arguments validate against the called tool's schema."""
    from headwise.server.protocol import ChatCompletionRequest
    from headwise.server.tool_parsers import FORMATS, message_calls
    from headwise.server.tools import plan_tools

    rng = random.Random(seed + 1)
    fmt = FORMATS["hermes"]
    jobs = []
    for i in range(n):
        tools = [
            {"type": "function", "function": {"name": f"tool_{i}_{k}", "parameters": make_schema(rng)}} for k in (0, 1)
        ]
        ask = [{"role": "user", "content": "Call a tool with sensible arguments."}]
        body = ChatCompletionRequest.model_validate({"messages": ask, "tools": tools, "tool_choice": "required"})
        plan = plan_tools(body, fmt)
        prompt = engine.encode_chat(ask, tools=plan.tools)
        jobs.append((prompt, SamplingParams(max_tokens=160, temperature=0.7, seed=i, grammar=plan.grammar), tools))
    t = time.perf_counter()
    outs = engine.generate([p for p, _, _ in jobs], [sp for _, sp, _ in jobs])
    stopped = valid = calls_seen = 0
    for out, (_, _, tools) in zip(outs, jobs):
        if out.finish_reason != "stop":
            continue
        stopped += 1
        calls = message_calls(fmt.parse(out.text, final=True), [], parallel=True)
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        try:
            assert calls, "no call"
            for call in calls:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
            valid += 1
            calls_seen += len(calls)
        except (AssertionError, KeyError, ValueError, jsonschema.ValidationError) as e:
            print("INVALID:", out.text, e)
    print(
        f"tool_choice required: {n} requests, {stopped} ended with stop, {valid}/{stopped} of those are calls "
        f"whose arguments validate ({calls_seen} calls), {n - stopped} cut by max_tokens=160; "
        f"{time.perf_counter() - t:.1f} s"
    )


def decode_ms(engine: LLMEngine, constrained: bool, batch: int, tokens: int) -> float:
    """Median ms of the steps where all `batch` requests decode."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}
    prompt = engine.encode_chat([{"role": "user", "content": "List some numbers."}])
    for i in range(batch):
        grammar = json_schema_spec(schema, "schema") if constrained else None
        engine.add_request(
            f"{constrained}-{i}-{time.monotonic_ns()}",
            prompt,
            SamplingParams(max_tokens=tokens, temperature=0.7, seed=i, ignore_eos=True, grammar=grammar),
        )
    times = []
    while engine.has_unfinished_requests():
        full = engine.stats().num_running == batch and all(not s.is_prefill for s in engine.scheduler.running)
        t = time.perf_counter()
        engine.step()
        if full:
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemas", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tools", type=int, default=50, help="tool_choice required requests (0: skip)")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(kv_cache_mb=512))
    if args.schemas:
        correctness(engine, args.schemas, args.seed)
    if args.tools:
        tool_calls(engine, args.tools, args.seed)
    if not args.repeats:
        return
    runs: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for constrained in (False, True):
            runs[constrained].append(decode_ms(engine, constrained, args.batch, args.tokens))
    free, cons = statistics.median(runs[False]), statistics.median(runs[True])
    print(
        f"decode ms/step at batch {args.batch}: unconstrained {runs[False]} median {free:.1f}; "
        f"json_schema {runs[True]} median {cons:.1f}; ratio {cons / free:.3f}"
    )


if __name__ == "__main__":
    main()
