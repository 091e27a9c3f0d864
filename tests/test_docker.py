"""The Dockerfile, checked without docker: stages, pins, user, volume, entrypoint, healthcheck,
and that its environment configures `headwise serve` as intended."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

from headwise.clients.cli import build_parser
from headwise.engine.loader import cache_root

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for op, args in stage:
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def pinned_requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_multi_stage_build_on_a_pinned_cuda_runtime_image():
    steps = instructions()
    arg = next(args for op, args in steps if op == "ARG" and args.startswith("CUDA_IMAGE="))
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", image), image
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0] == "${CUDA_IMAGE} AS build" and froms[1] == "${CUDA_IMAGE}"
    assert any(op == "COPY" and args.startswith("--from=build /opt/venv") for op, args in final_stage())


def test_every_installed_package_is_pinned_by_requirements_txt():
    pins = pinned_requirements()
    installs = [args for op, args in instructions() if op == "RUN" and "pip install" in args]
    assert len(installs) == 2
    words = shlex.split(installs[0])
    assert words[words.index("-c") + 1] == "requirements.txt"
    packages = [w for w in words[words.index("-c") + 2 :] if not w.startswith("-")]
    assert "torch" in packages and "fastapi" in packages and "uvicorn" in packages
    missing = [p for p in packages if p.lower() not in pins]
    assert not missing, f"not pinned in requirements.txt: {missing}"
    assert installs[1].endswith("--no-deps .")


def test_runtime_runs_as_a_non_root_user_with_the_model_volume_and_port():
    stage = final_stage()
    users = [args for op, args in stage if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    volumes = [json.loads(args) for op, args in stage if op == "VOLUME"]
    assert ["/models"] in volumes
    assert env_of(stage)["HEADWISE_MODEL"].startswith("/models")
    assert ("EXPOSE", "8000") in stage and env_of(stage)["HEADWISE_PORT"] == "8000"
    assert json.loads(dict(stage)["ENTRYPOINT"]) == ["headwise", "serve"]
    assert (Path(sys.executable).parent / "headwise").exists(), "the console script the entrypoint runs"


def test_the_image_environment_configures_headwise_serve(monkeypatch):
    env = env_of(final_stage())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    served = {f"HEADWISE_{key.upper()}": str(value) for key, value in vars(args).items()}
    for name, value in env.items():
        if name == "HEADWISE_CACHE":  # read by the model loader, not a flag
            assert str(cache_root()) == value
        elif name.startswith("HEADWISE_"):
            assert served[name] == value, name
    assert args.host == "0.0.0.0"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_passes_only_when_health_is_200(status, healthy):
    command = dict(final_stage())["HEALTHCHECK"].split(" CMD ", 1)[1]
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        words = shlex.split(command)
        assert words[0] == "python3"
        env = {"HEADWISE_PORT": str(server.server_address[1]), "PATH": str(Path(sys.executable).parent)}
        run = subprocess.run([sys.executable, *words[1:]], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (run.returncode == 0) == healthy


def test_dockerignore_keeps_the_venv_and_git_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)


def build_stage_copies() -> list[str]:
    """The paths the build stage copies from the context (COPY without --from)."""
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    sources = []
    for op, args in steps[:last_from]:
        if op == "COPY" and not args.startswith("--"):
            sources += shlex.split(args)[:-1]
    return sources


def pyproject_package_dirs() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def test_every_package_in_pyproject_is_copied_into_the_build_stage():
    copied = set(build_stage_copies())
    assert {"pyproject.toml", "README.md"} <= copied
    missing = {pkg: folder for pkg, folder in pyproject_package_dirs().items() if folder.split("/")[0] not in copied}
    assert not missing, f"pyproject.toml packages the Dockerfile does not COPY: {missing}"


def test_the_wheel_builds_from_exactly_the_files_the_dockerfile_copies(tmp_path):
    """What `docker build` sees: the COPY sources minus .dockerignore, then `pip install .`
    builds a wheel from them (here without docker: the same pip step, no network)."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    context = tmp_path / "context"
    context.mkdir()

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch(n, pattern.removeprefix("**/")) for pattern in ignored)}

    for source in build_stage_copies():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=skip)
        else:
            shutil.copy2(src, context / source)
    out = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    run = subprocess.run(command, cwd=context, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = out.glob("headwise-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in pyproject_package_dirs():
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"{package} is not in the wheel"
    assert any(n.startswith("headwise/kvcache/plans_data/") and n.endswith(".json") for n in names)
