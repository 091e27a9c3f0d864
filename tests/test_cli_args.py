"""The command line's own contract: no abbreviated flags, unknown flags reported by the
subcommand that got them, plan files checked before any weights load, shipped plans."""

from __future__ import annotations

import argparse
import json

import pytest

from headwise.clients.cli import build_parser, main
from headwise.clients.engine_args import engine_config_from_args
from headwise.kvcache.shipped_plans import shipped_plans

SHIPPED = ["duo-10", "retrieval-20", "streaming"]
ENGINE_COMMANDS = [["serve"], ["generate", "--prompt", "hi"], ["eval"], ["bench", "offline"], ["bench", "latency"]]


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_takes_abbreviated_flags():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) >= 20  # headwise, 6 commands, their subcommands
    assert [p.prog for p in parsers if p.allow_abbrev] == []


@pytest.mark.parametrize(
    "argv, prog, bad",
    [
        (["generate", "--prompt", "hi", "--max-token", "5"], "headwise generate", "--max-token 5"),
        (["plan", "show", "x.json", "--dtype-byte", "2"], "headwise plan show", "--dtype-byte 2"),
        (["profile", "retrieval", "--out", "x.json", "--sample", "2"], "headwise profile retrieval", "--sample 2"),
        (["bench", "capacity", "--kv-cache", "4"], "headwise bench capacity", "--kv-cache 4"),
        (["serve", "--max-queu", "3"], "headwise serve", "--max-queu 3"),
    ],
)
def test_unknown_flag_names_itself_under_the_subcommands_usage(capsys, argv, prog, bad):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"usage: {prog} ")
    assert err.endswith(f"\n{prog}: error: unrecognized arguments: {bad}\n")


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a command gets as far as building an engine or a server, or
    resolving the model (converting or reading weights)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the plan files were checked")

    for target in (
        "headwise.engine.llm_engine.LLMEngine",
        "headwise.server.serve.serve",
        "headwise.engine.loader.resolve_model_dir",
        "headwise.engine.loader.read_safetensors",
    ):
        monkeypatch.setattr(target, refuse)


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "No such file or directory"),
        ("{nope", "not valid JSON (line 1 column 2: Expecting property name enclosed in double quotes)"),
        ('{"format": "headwise-plan/1"}', "name: missing"),
        ('{"format": "headwise-plan/0", "name": "x"}', "format: expected 'headwise-plan/1', got 'headwise-plan/0'"),
    ],
)
def test_bad_plan_file_is_one_line_before_the_model_loads(tmp_path, capsys, no_weights, command, content, problem):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    rc = main([*command, "--plan", f"x={path}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"headwise {command[0]}: error: plan 'x': {path}: {problem}\n"


def test_plan_that_is_a_directory_is_refused_by_name(tmp_path, capsys, no_weights):
    assert main(["serve", "--plan", f"d={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"headwise serve: error: plan 'd': {tmp_path}: Is a directory\n"


def test_default_plan_must_be_loaded(capsys, no_weights):
    assert main(["serve", "--default-plan", "nope"]) == 2
    assert capsys.readouterr().err == (
        "headwise serve: error: --default-plan 'nope' is not loaded (loaded: full, duo-10, retrieval-20, streaming)\n"
    )


def test_the_default_model_ships_three_plans_with_provenance():
    plans = shipped_plans("smollm2-135m")
    assert sorted(plans) == SHIPPED
    for name, path in plans.items():  # noqa: B007
        d = json.loads(open(path).read())
        assert d["format"] == "headwise-plan/1" and d["model"]["id"] == "smollm2-135m"
        source = d["source"]
        assert {"method", "params", "created", "command", "commit"} <= set(source)
        assert source["command"].startswith("headwise ") and len(source["commit"]) == 40
    methods = {name: json.loads(open(p).read())["source"]["method"] for name, p in plans.items()}
    assert methods == {"duo-10": "duo", "retrieval-20": "retrieval", "streaming": "streaming"}


@pytest.mark.parametrize("model_id", ["other-model", "/models/smollm2-135m", "../smollm2-135m", ""])
def test_no_plans_ship_for_other_models_or_paths(model_id):
    assert shipped_plans(model_id) == {}


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_engine_commands_load_the_shipped_plans_by_default(command):
    config = engine_config_from_args(build_parser().parse_args(command))
    assert config.plans == shipped_plans("smollm2-135m") and config.default_plan == "full"


def test_no_shipped_plans_flag_and_environment_leave_them_out(monkeypatch):
    assert engine_config_from_args(build_parser().parse_args(["serve", "--no-shipped-plans"])).plans == {}
    monkeypatch.setenv("HEADWISE_NO_SHIPPED_PLANS", "1")
    assert engine_config_from_args(build_parser().parse_args(["serve"])).plans == {}
    monkeypatch.setenv("HEADWISE_NO_SHIPPED_PLANS", "maybe")
    with pytest.raises(SystemExit, match="HEADWISE_NO_SHIPPED_PLANS='maybe': expected true or false"):
        build_parser()


def test_a_user_plan_replaces_the_shipped_one_of_its_name(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(open(shipped_plans("smollm2-135m")["streaming"]).read())
    config = engine_config_from_args(
        build_parser().parse_args(["serve", "--plan", f"streaming={mine}", "--default-plan", "streaming"])
    )
    assert config.plans["streaming"] == str(mine) and sorted(config.plans) == SHIPPED
    assert config.default_plan == "streaming"


def test_shipped_plans_are_package_data():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    packaged = {str(p) for g in globs["headwise.kvcache"] for p in (root / "kvcache").glob(g)}
    assert set(shipped_plans("smollm2-135m").values()) <= packaged
