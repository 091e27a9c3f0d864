"""The README runs as written.

Every command of its ```sh blocks is either run here or named in NOT_RUN with the reason;
a run command gets the venv's `headwise` for `.venv/bin/headwise`, a temp dir holding
`examples/`, and a small KV pool, and must exit 0 and write the files it names. Commands
that run the model for a minute or more on 2 cores (SLOW) are marked slow, as are model
loads that read no examples/ file (LOADS_MODEL) and any command that reads what a slow one
wrote. The ```python block runs against a live server built from `headwise serve`'s own
defaults (the shipped plans)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADWISE = Path(sys.executable).parent / "headwise"
KV_CACHE_MB = "256"  # the engine commands' pool: a quarter of the default, room for a few 1k prompts

# Commands CI does not run, by their first words (a `headwise` command by its subcommand).
NOT_RUN = {
    ("make", "serve"): "a server that runs until stopped; its plans are served below",
    ("make", "test"): "the test suite itself",
    ("headwise", "serve"): "a server that runs until stopped",
    ("headwise", "bench", "serve"): "needs a running server; tests/test_bench_serve.py runs it against one",
    ("locust",): "load against a running server; tests/test_loadtest.py runs the users",
    ("docker",): "needs docker and a GPU node; tests/test_docker.py checks the Dockerfile",
}
# Subcommands that run the model for a minute or more on 2 cores.
SLOW = (("profile",), ("eval",), ("bench", "offline"), ("bench", "latency"), ("bench", "kernels"))
# Subcommands that load the model (~10 s each on 2 cores): to keep `make test` near its
# budget, only those that read an examples/ file run by default, the others with SLOW.
LOADS_MODEL = (("generate",),)
# Flags whose value is a file the command writes; so is --json's when it takes one (eval's and
# bench latency's do, generate's is a switch).
OUTPUT_FLAGS = {"--out", "--png", "--result-json"}


@dataclasses.dataclass
class Command:
    line: str  # as the README shows it, continuation lines joined
    argv: list[str]  # variables expanded, comments dropped
    outputs: list[str]
    inputs: list[str]  # files earlier commands wrote
    slow: bool = False

    @property
    def words(self) -> tuple[str, ...]:
        """`.venv/bin/headwise plan show rh.json ...` -> ("headwise", "plan", "show")."""
        words = [Path(self.argv[0]).name]
        for a in self.argv[1:]:
            if not re.fullmatch(r"[a-z][a-z-]*", a):
                break
            words.append(a)
        return tuple(words)

    @property
    def id(self) -> str:
        return "-".join(self.words[1:]) or self.words[0]


def fenced_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def readme_commands() -> list[Command]:
    variables: dict[str, str] = {}
    commands: list[Command] = []
    written: dict[str, Command] = {}
    for block in fenced_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m[1]], line), comments=True)
            outputs = [
                argv[i + 1]
                for i, a in enumerate(argv[:-1])
                if a in OUTPUT_FLAGS or (a == "--json" and not argv[i + 1].startswith("-"))
            ]
            # a NAME=PATH plan names its file after the '='
            files = [a.rpartition("=")[2] for a in argv[1:]]
            inputs = [f for f in files if f in written and f not in outputs]
            cmd = Command(line, argv, outputs, inputs)
            reads_examples = any(a.startswith("examples/") for a in argv)
            cmd.slow = (
                any(cmd.words[1 : 1 + len(s)] == s for s in SLOW)
                or (any(cmd.words[1 : 1 + len(s)] == s for s in LOADS_MODEL) and not reads_examples)
                or any(written[f].slow for f in inputs)
            )
            commands.append(cmd)
            for f in outputs:
                written[f] = cmd
    return commands


def not_run_reason(cmd: Command) -> str | None:
    for words, why in NOT_RUN.items():
        if cmd.words[: len(words)] == words:
            return why
    return None


COMMANDS = readme_commands()
RUN = [c for c in COMMANDS if not_run_reason(c) is None]


def test_every_readme_command_is_a_headwise_command_or_allow_listed():
    assert len(COMMANDS) >= 30  # the parser found the blocks
    strangers = [c.line for c in RUN if c.words[0] != "headwise"]
    assert strangers == []
    # every reason is used, and a file has one writer (a command's prerequisites are unambiguous)
    assert [w for w in NOT_RUN if not any(c.words[: len(w)] == w for c in COMMANDS)] == []
    outputs = [f for c in COMMANDS for f in c.outputs]
    assert len(outputs) == len(set(outputs))


def test_readme_examples_files_exist():
    named = set(re.findall(r"examples/[\w.-]+", README.read_text()))
    assert {
        "examples/prompts.jsonl",
        "examples/scores.json",
        "examples/full_attention_heads.tsv",
        "examples/moa.json",
        "examples/task.jsonl",
    } <= named
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    (d / "examples").symlink_to(ROOT / "examples")
    return d


_done: set[int] = set()


def _run(cmd: Command, workdir: Path) -> None:
    # a command runs once per workdir, after whatever wrote its inputs
    if id(cmd) in _done:
        return
    for f in cmd.inputs:
        _run(next(c for c in COMMANDS if f in c.outputs), workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADWISE_") or k == "HEADWISE_CACHE"}
    env.update(OMP_NUM_THREADS="1", HEADWISE_KV_CACHE_MB=KV_CACHE_MB)
    proc = subprocess.run(
        [str(HEADWISE), *cmd.argv[1:]], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{cmd.line}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    missing = [f for f in cmd.outputs if not (workdir / f).is_file()]
    assert missing == [], f"{cmd.line} did not write {missing}"
    _done.add(id(cmd))


@pytest.mark.parametrize(
    "cmd",
    [pytest.param(c, id=f"{i:02d}-{c.id}", marks=[pytest.mark.slow] if c.slow else []) for i, c in enumerate(RUN)],
)
def test_readme_command_runs(cmd, workdir):
    _run(cmd, workdir)


def test_readme_openai_snippet_shows_a_saving_against_serve_defaults(capsys):
    from headwise.clients.cli import build_parser
    from headwise.clients.commands.serve import settings_from_args
    from headwise.clients.engine_args import engine_config_from_args
    from headwise.engine.llm_engine import LLMEngine
    from headwise.server.background import BackgroundServer

    # what `make serve` runs, on a free port and a smaller pool
    args = build_parser().parse_args(["serve", "--kv-cache-mb", KV_CACHE_MB, "--port", "0"])
    config = engine_config_from_args(args)
    assert sorted(config.plans) == ["duo-10", "retrieval-20", "streaming"]
    (snippet,) = fenced_blocks("python")
    assert 'base_url="http://127.0.0.1:8000/v1"' in snippet
    with BackgroundServer(settings_from_args(args), lambda: LLMEngine(config)) as server:
        models = httpx.get(server.url + "/v1/models").json()["data"][0]
        assert models["kv_plans"] == ["duo-10", "full", "retrieval-20", "streaming"]
        assert models["default_kv_plan"] == "full"
        namespace: dict = {}
        exec(snippet.replace("http://127.0.0.1:8000", server.url), namespace)
        block_bytes = server.state.engine.kv_manager.block_bytes
    kv_bytes, prompt_tokens = namespace["kv_bytes"], namespace["r"].usage.prompt_tokens
    heads = 30 * 3
    # a window head holds at most its 4 sink blocks, the 16 of its 256-token window and one
    # partly expired block (kvcache/head_tables.py, window_max); full heads at least the prompt
    assert kv_bytes["streaming"] == heads * (4 + 16 + 1) * block_bytes
    assert kv_bytes["full"] >= heads * math.ceil(prompt_tokens / 16) * block_bytes
    assert 900 < prompt_tokens < 1100  # the README calls it a ~1000-token prompt
    assert 0.3 < kv_bytes["streaming"] / kv_bytes["full"] < 0.4  # "about a third"
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["full", "streaming"]
    assert printed[1].startswith(
        f"streaming: {prompt_tokens} prompt tokens, {kv_bytes['streaming'] / 2**20:.1f} MiB of KV, "
    )
