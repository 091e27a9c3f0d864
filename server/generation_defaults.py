"""`--generation-config`: the model's recommended sampling defaults, as vLLM applies them.

`auto` reads `generation_config.json` next to the weights, `vllm` uses none (the engine's
own defaults), any other value is a folder holding a `generation_config.json`. The
values found fill only what a request leaves unset: a request's own temperature always
wins. HF's `max_new_tokens` becomes the default `max_tokens`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from headwise.engine.sampling_params import InvalidRequest, SamplingParams

log = logging.getLogger(__name__)

FILE = "generation_config.json"
# generation_config.json key -> request field; vLLM's list (do_sample is not read, as in vLLM)
KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


class GenerationConfigError(ValueError):
    """--generation-config names a folder without a readable generation_config.json."""


def load_generation_defaults(source: str, model_dir: Path | None) -> dict[str, float | int]:
    """Request-field defaults from `source` (auto | vllm | a folder); {} when there are none."""
    if source == "vllm":
        return {}
    if source == "auto":
        if model_dir is None or not (Path(model_dir) / FILE).is_file():
            log.info("generation config: the model has no %s; engine defaults apply", FILE)
            return {}
        path = Path(model_dir) / FILE
    else:
        path = Path(source).expanduser() / FILE
        if not path.is_file():
            raise GenerationConfigError(f"--generation-config {source}: no {FILE} in that folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GenerationConfigError(f"--generation-config: cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise GenerationConfigError(f"--generation-config: {path} is not a JSON object")
    defaults = {field: raw[key] for key, field in KEYS.items() if _usable(raw.get(key))}
    try:
        SamplingParams(**defaults)  # a default out of range would fail every request that uses it
    except (InvalidRequest, TypeError) as e:
        raise GenerationConfigError(f"--generation-config: {path}: {e}") from None
    if defaults:
        log.info("generation config %s: defaults %s (a request's own values win)", path, defaults)
    return defaults


def _usable(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
