"""`headwise plan ...` end to end through the CLI entry point, on a config-only model dir."""

from __future__ import annotations

import json

import pytest

from headwise.clients.cli import main
from headwise.kvcache.plans import HeadSpec, ModelShape, load_plan

SHAPE = ModelShape(4, 2, 4, 16, "tiny")  # hidden 64 / 4 heads -> head_dim 16


@pytest.fixture
def model(tmp_path) -> str:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "vocab_size": 128,
            }
        )
    )
    return str(d)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_streaming_writes_a_plan_for_the_model(tmp_path, model, capsys):
    out = tmp_path / "s.json"
    rc, stdout, _ = run(capsys, "streaming", "--model", model, "--sink", "4", "--recent", "60", "--out", str(out))
    assert rc == 0
    plan = load_plan(out, SHAPE)
    assert plan.name == "streaming-4-60" and plan.heads[3][1] == HeadSpec("window", sink=4, recent=60)
    assert stdout == (f"wrote {out}: plan 'streaming-4-60', 0 of 8 kv heads full, KV 0.016x of full at 4096 tokens\n")


def test_select_and_dynamic_write_plans_for_the_model(tmp_path, model, capsys):
    out = tmp_path / "sel.json"
    rc, stdout, _ = run(
        capsys,
        "select",
        "--model",
        model,
        "--sink",
        "4",
        "--recent",
        "28",
        "--select",
        "32",
        "--window",
        "8",
        "--out",
        str(out),
    )
    assert rc == 0
    plan = load_plan(out, SHAPE)
    assert plan.name == "select-4-32-28" and plan.dynamic is None
    assert {s for row in plan.heads for s in row} == {HeadSpec("select", sink=4, recent=28, select=32, window=8)}
    out = tmp_path / "dyn.json"
    rc, stdout, _ = run(
        capsys,
        "dynamic",
        "--model",
        model,
        "--ratio",
        "0.5",
        "--sink",
        "4",
        "--recent",
        "28",
        "--select",
        "32",
        "--window",
        "8",
        "--out",
        str(out),
    )
    assert rc == 0
    plan = load_plan(out, SHAPE)
    assert plan.name == "dynamic-50" and plan.dynamic.ratio == 0.5
    assert plan.dynamic.rest == HeadSpec("select", sink=4, recent=28, select=32, window=8)
    assert stdout.startswith(f"wrote {out}: plan 'dynamic-50', dynamic")
    rc, _, err = run(capsys, "dynamic", "--model", model, "--ratio", "1.5", "--out", str(tmp_path / "x.json"))
    assert rc == 2 and err == "headwise plan: error: ratio: must be a number in [0, 1], got 1.5\n"


def test_show_prints_layer_table_total_and_png(tmp_path, model, capsys):
    (tmp_path / "g.tsv").write_text("0.9\t0.1\n0.2\t0.8\n0.1\t0.1\n0.1\t0.1\n")
    plan = tmp_path / "d.json"
    assert (
        run(
            capsys,
            "import",
            "duo",
            str(tmp_path / "g.tsv"),
            "--model",
            model,
            "--ratio",
            "0.25",
            "--sink",
            "4",
            "--recent",
            "60",
            "--out",
            str(plan),
        )[0]
        == 0
    )
    rc, stdout, _ = run(capsys, "show", str(plan), "--context", "1024", "--png", str(tmp_path / "m.png"))
    assert rc == 0
    lines = stdout.splitlines()
    assert lines[0] == "plan 'duo-25': model tiny (4 layers x 2 kv heads, 4 heads, head_dim 16), source duo"
    assert lines[1].startswith("context 1024 (prompt 1024), block 16, float32, 4 bytes/element; ")
    assert lines[3].split() == ["0", "F", "W", "1x1024", "1x64", "138.0", "KiB", "256.0", "KiB", "0.539"]
    assert lines[5].split()[:3] == ["2", "W", "W"]
    # blocks the engine holds: 2 full heads x 64 + 6 window heads x 5 (the sink block and the 4 blocks
    # the 60-token window overlaps), x 16 slots x 128 bytes (K + V, 16 fp32), of 8 x 64 blocks
    assert lines[7] == "total: 2 of 8 kv heads full, KV 316.0 KiB of 1.0 MiB full per request = 0.309x at 1024 tokens"
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "flags, element",
    [(["--dtype", "bfloat16"], "bfloat16, 2"), (["--dtype", "float16"], "float16, 2"), (["--dtype-bytes", "2"], "2")],
)
def test_show_counts_the_bytes_of_another_dtype(tmp_path, model, capsys, flags, element):
    (tmp_path / "g.tsv").write_text("0.9\t0.1\n0.2\t0.8\n0.1\t0.1\n0.1\t0.1\n")
    plan = tmp_path / "d.json"
    run(
        capsys,
        "import",
        "duo",
        str(tmp_path / "g.tsv"),
        "--model",
        model,
        "--ratio",
        "0.25",
        "--sink",
        "4",
        "--recent",
        "60",
        "--out",
        str(plan),
    )
    rc, stdout, _ = run(capsys, "show", str(plan), "--context", "1024", *flags)
    lines = stdout.splitlines()
    assert rc == 0 and f"block 16, {element} bytes/element; " in lines[1]
    assert lines[7] == "total: 2 of 8 kv heads full, KV 158.0 KiB of 512.0 KiB full per request = 0.309x at 1024 tokens"


def test_show_takes_a_dtype_or_an_element_size_not_both(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "show", str(tmp_path / "p.json"), "--dtype", "float32", "--dtype-bytes", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "headwise plan show: error: argument --dtype-bytes: not allowed with argument --dtype\n"
    )


def test_import_retrieval_head_and_moa(tmp_path, model, capsys):
    scores = {f"{i}-{h}": [0.0] for i in range(4) for h in range(4)}
    scores["1-3"] = [0.6, 0.4]
    (tmp_path / "r.json").write_text(json.dumps(scores))
    rc, stdout, _ = run(
        capsys,
        "import",
        "retrieval-head",
        str(tmp_path / "r.json"),
        "--model",
        model,
        "--out",
        str(tmp_path / "r-plan.json"),
    )
    assert rc == 0 and "plan 'retrieval-25', 2 of 8 kv heads full" in stdout
    plan = load_plan(tmp_path / "r-plan.json", SHAPE)
    assert plan.heads[1][1].kind == "full" and plan.scores[1] == [0.0, 0.5]

    (tmp_path / "moa.json").write_text(json.dumps({"alphas": [[0, 1024]] * 4, "betas": [[0.5, 0.25]] * 4}))
    rc, _, _ = run(
        capsys, "import", "moa", str(tmp_path / "moa.json"), "--model", model, "--out", str(tmp_path / "m-plan.json")
    )
    assert rc == 0
    assert load_plan(tmp_path / "m-plan.json").heads[0] == [
        HeadSpec("elastic", sink=64, alpha=0.0, beta=0.5),
        HeadSpec("elastic", sink=64, alpha=1024.0, beta=0.25),
    ]


def test_ratio_rethresholds_saved_scores(tmp_path, model, capsys):
    (tmp_path / "g.tsv").write_text("0.9\t0.1\n0.2\t0.8\n0.3\t0.4\n0.7\t0.6\n")
    run(capsys, "import", "duo", str(tmp_path / "g.tsv"), "--model", model, "--out", str(tmp_path / "d.json"))
    rc, stdout, _ = run(capsys, "ratio", str(tmp_path / "d.json"), "--ratio", "0.25", "--out", str(tmp_path / "q.json"))
    assert rc == 0 and "plan 'duo-25', 2 of 8 kv heads full" in stdout
    plan = load_plan(tmp_path / "q.json")
    assert [(i, j) for i in range(4) for j in range(2) if plan.heads[i][j].kind == "full"] == [(0, 0), (1, 1)]


@pytest.mark.parametrize(
    "argv, error",
    [
        (["show", "{tmp}/missing.json"], "{tmp}/missing.json: No such file or directory"),
        (
            ["show", "{tmp}/bad.json"],
            "{tmp}/bad.json: not valid JSON (line 1 column 2: Expecting property name enclosed in double quotes)",
        ),
        (
            ["ratio", "{tmp}/wide.json", "--ratio", "0.5", "--out", "{tmp}/o.json"],
            "{tmp}/wide.json: model.kv_heads: must be an integer >= 1, got 0",
        ),
        (
            ["import", "duo", "{tmp}/short.tsv", "--model", "{model}", "--out", "{tmp}/o.json"],
            "{tmp}/short.tsv: gates for 3 layers, model has 4",
        ),
        (
            ["import", "moa", "{tmp}/short.tsv", "--model", "{model}", "--ratio", "0.5", "--out", "{tmp}/o.json"],
            "moa plans give every head its own elastic span: --ratio and --recent do not apply",
        ),
        (
            ["streaming", "--model", "{tmp}/nomodel", "--out", "{tmp}/o.json"],
            "model '{tmp}/nomodel' not found: use smollm2-135m, a .gguf file or a model directory",
        ),
        (
            ["streaming", "--model", "{model}", "--sink", "-1", "--out", "{tmp}/o.json"],
            "sink: must be an integer >= 0, got -1",
        ),
        (
            ["ratio", "{tmp}/s.json", "--ratio", "0.5", "--out", "{tmp}/o.json"],
            "plan 'streaming-64-256' has no scores to re-threshold (it was not built from scores)",
        ),
        (
            ["show", "{tmp}/s.json", "--context", "10", "--prompt", "20"],
            "--prompt must be in [1, --context 10], got 20",
        ),
    ],
)
def test_bad_input_is_one_line_error_with_exit_2(tmp_path, model, capsys, argv, error):
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "short.tsv").write_text("0.5\t0.5\n" * 3)
    (tmp_path / "wide.json").write_text(
        json.dumps(
            {
                "format": "headwise-plan/1",
                "name": "w",
                "model": {"layers": 4, "kv_heads": 0, "heads": 4, "head_dim": 16},
                "heads": [],
            }
        )
    )
    run(capsys, "streaming", "--model", model, "--out", str(tmp_path / "s.json"))
    rc, _, err = run(capsys, *[a.format(tmp=tmp_path, model=model) for a in argv])
    assert rc == 2
    assert err == f"headwise plan: error: {error.format(tmp=tmp_path, model=model)}\n"
    assert not (tmp_path / "o.json").exists()


def test_bench_capacity_counts_requests_per_plan(tmp_path, model, capsys):
    run(capsys, "streaming", "--model", model, "--sink", "4", "--recent", "12", "--out", str(tmp_path / "w.json"))
    run(
        capsys,
        "select",
        "--model",
        model,
        "--sink",
        "4",
        "--recent",
        "12",
        "--select",
        "16",
        "--out",
        str(tmp_path / "s.json"),
    )
    rc = main(
        [
            "bench",
            "capacity",
            "--model",
            model,
            "--plan",
            f"w={tmp_path / 'w.json'}",
            "--plan",
            f"s={tmp_path / 's.json'}",
            "--kv-cache-mb",
            "1",
            "--input-len",
            "100",
            "--output-len",
            "29",
            "--json",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    # 1 MiB of 16-slot fp32 blocks of head_dim 16 (+ int32 positions) = 496 blocks; 8 kv heads
    assert rows == [
        {
            "plan": "full",
            "blocks_peak": 64,
            "blocks_decode": 64,
            "pool_blocks": 496,
            "admitted_at_once": 7,
            "held_decoding": 7,
        },
        # a window head: its sink block and the (at most two) blocks its 12 positions overlap
        {
            "plan": "w",
            "blocks_peak": 24,
            "blocks_decode": 24,
            "pool_blocks": 496,
            "admitted_at_once": 20,
            "held_decoding": 20,
        },
        # bounded select heads (--select-margin 2) hold 4 + 2 x 16 + 12 slots (3 blocks) while the
        # prompt is computed, then 4 + 16 + 12 (2 blocks)
        {
            "plan": "s",
            "blocks_peak": 24,
            "blocks_decode": 16,
            "pool_blocks": 496,
            "admitted_at_once": 20,
            "held_decoding": 30,
        },
    ]
    assert main(["bench", "capacity", "--model", model, "--input-len", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
