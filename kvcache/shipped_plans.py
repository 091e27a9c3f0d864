"""Plans profiled for a model and installed with the package, so a fresh install serves
them without profiling (docs/design.md, "Plans").

`plans_data/<model id>/<name>.json`, package data next to this file; each plan's `source`
says how it was made (method, params, created, the command and the headwise commit).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_plans(model_id: str) -> dict[str, str]:
    """Plan name -> file of every plan shipped for `model_id`, by name; empty for a model
    without shipped plans (a path or any other id)."""
    if not model_id or "/" in model_id or "\\" in model_id or model_id.startswith("."):
        return {}
    # setuptools installs package data as plain files, so the traversable is a real path
    folder = Path(str(resources.files("headwise.kvcache") / "plans_data" / model_id))
    if not folder.is_dir():
        return {}
    return {f.stem: str(f) for f in sorted(folder.glob("*.json"))}
