"""scripts/gpu_lease.sh runs unattended on a GPU lease, so what can be checked without one is
checked here: it parses, refuses unknown arguments, and every flag it passes exists in the
command it passes it to. (Its `--cpu-smoke` run takes minutes and is not part of the suite.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
from pathlib import Path

from headwise.clients.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_lease.sh"
# flags of the other programs the script calls
OTHER_TOOLS = {
    "--no-index",
    "--no-deps",
    "--no-build-isolation",
    "--no-compile",
    "--target",  # pip
    "--query-gpu",
    "--format",  # nvidia-smi
    "--short",  # git rev-parse
    "--cpu-smoke",
}  # the script's own


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def _measure_load_parser() -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("measure_load", ROOT / "scripts" / "measure_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_script_parses_as_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_script_refuses_an_unknown_argument_before_doing_anything(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "usage: bash scripts/gpu_lease.sh [--cpu-smoke]\n"


def test_every_flag_the_script_passes_exists():
    code = "\n".join(line.split("#")[0] for line in SCRIPT.read_text().splitlines())
    # python heredocs are code, not command lines
    code = re.sub(r"<<'EOF'.*?\nEOF\n", "\n", code, flags=re.S)
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
    known = _option_strings(build_parser()) | _option_strings(_measure_load_parser()) | OTHER_TOOLS
    assert used - known == set()
    assert {"--load-format", "--num-iters", "--baseline", "--kv-plan", "--num-blocks", "--concurrency"} <= used
