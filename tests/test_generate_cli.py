"""`headwise generate`: batched JSON-lines prompts, --json output in input order, errors."""

from __future__ import annotations

import json

import pytest

from headwise.clients.cli import main
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.plan_build import streaming_plan
from headwise.kvcache.plans import save_plan


def test_prompts_file_json_lines_in_input_order(tmp_path, capsys, engine, tok):
    save_plan(streaming_plan(engine.model_config.shape, 4, 12), tmp_path / "s.json")
    lines = [
        {"prompt": "The capital of France is"},
        {"messages": [{"role": "user", "content": "Say hello."}]},
        {"prompt": "Once upon a time, there was a very long story about", "plan": "short"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rc = main(
        [
            "generate",
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--max-tokens",
            "24",
            "--json",
            "--kv-cache-mb",
            "64",
            "--plan",
            f"short={tmp_path / 's.json'}",
        ]
    )
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(out) == 3
    prompts = [
        tok(lines[0]["prompt"])["input_ids"],
        engine.encode_chat(lines[1]["messages"]),
        tok(lines[2]["prompt"])["input_ids"],
    ]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    for row, prompt in zip(out[:2], prompts[:2]):
        ref = engine.generate([prompt], greedy)[0]
        assert set(row) == {
            "text",
            "token_ids",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
            "kv_bytes",
            "kv_bytes_decode",
            "cached_tokens",
        }
        assert row["token_ids"] == ref.token_ids and row["text"] == ref.text
        assert row["prompt_tokens"] == len(prompt) and row["completion_tokens"] == len(ref.token_ids)
        assert row["finish_reason"] == ref.finish_reason and row["kv_bytes"] == ref.kv_bytes
        assert row["kv_bytes_decode"] == ref.kv_bytes_decode
    # the third prompt ran with the 4 + 12 streaming plan: every head holds its sink block
    # and the (at most two) blocks its 12-token window overlaps
    assert out[2]["prompt_tokens"] == len(prompts[2])
    assert out[2]["kv_bytes"] == 30 * 3 * 3 * 16 * 64 * 2 * 4


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--prompts", "{tmp}/missing.jsonl"], "--prompts {tmp}/missing.jsonl: no such file"),
        (["--prompts", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl:2: not JSON (Expecting value)"),
        (
            ["--prompts", "{tmp}/shape.jsonl"],
            '{tmp}/shape.jsonl:1: expected {{"prompt": "..."}} or {{"messages": [...]}}',
        ),
        (["--prompt", "hi", "--plan", "x={tmp}/missing.json"], "{tmp}/missing.json"),
    ],
)
def test_bad_generate_input_is_one_line(tmp_path, capsys, argv, error):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnope\n')
    (tmp_path / "shape.jsonl").write_text('{"text": "a"}\n')
    rc = main(["generate", *[a.format(tmp=tmp_path) for a in argv], "--kv-cache-mb", "16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("headwise generate: error: ") and error.format(tmp=tmp_path) in err
    assert err.count("\n") == 1


def test_json_schema_and_regex_constrain_every_output(tmp_path, capsys):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    base = ["generate", "--prompt", "Name a city.", "--chat", "--max-tokens", "30", "--json", "--kv-cache-mb", "16"]
    assert main([*base, "--json-schema", str(tmp_path / "s.json")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finish_reason"] == "stop"
    jsonschema.validate(json.loads(row["text"]), schema)
    assert main([*base, "--regex", "[A-Z][a-z]{2,8}"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finish_reason"] == "stop" and row["text"][0].isupper() and row["text"][1:].islower()


@pytest.mark.parametrize(
    "flag, value, error",
    [
        ("--json-schema", "{tmp}/bad.json", "--json-schema: keyword 'not' is not supported at #"),
        ("--json-schema", "{tmp}/none.json", "--json-schema {tmp}/none.json: no such file"),
        ("--regex", "[a-", "--regex does not compile: Regex parsing error at position 4: Unclosed '['"),
    ],
)
def test_bad_json_schema_or_regex_is_one_line(tmp_path, capsys, flag, value, error):
    (tmp_path / "bad.json").write_text('{"not": {"type": "string"}}')
    rc = main(["generate", "--prompt", "hi", flag, value.format(tmp=tmp_path), "--kv-cache-mb", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and error.format(tmp=tmp_path) in err and err.count("\n") == 1
