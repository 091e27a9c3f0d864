"""Every pointer into docs/design.md names a section it has: docstrings and comments cite
`docs/design.md, "KV cache"`, the README links `docs/design.md#plans`."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "kvcache", "engine", "synthetic", "server", "profilers", "clients", "loadtest", "tests")


def sections() -> set[str]:
    return set(re.findall(r"^## (.+)$", (ROOT / "docs" / "design.md").read_text(), flags=re.M))


def test_every_cited_design_section_exists():
    files = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")] + [ROOT / "pyproject.toml"]
    cited: dict[str, list[str]] = {}
    for path in files:
        for name in re.findall(r'docs/design\.md,?\s+"([^"]+)"', path.read_text()):
            # a name may wrap across docstring lines
            cited.setdefault(" ".join(name.split()), []).append(str(path.relative_to(ROOT)))
    assert {"KV cache", "Plans", "Profilers", "Layers", "One engine step", "Prefix caching"} <= set(cited)
    assert {name: where for name, where in cited.items() if name not in sections()} == {}


def test_readme_links_to_design_sections_that_exist():
    anchors = {s.lower().replace(" ", "-") for s in sections()}
    linked = re.findall(r"docs/design\.md#([\w-]+)", (ROOT / "README.md").read_text())
    assert linked and [a for a in linked if a not in anchors] == []
