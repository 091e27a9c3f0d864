"""Opt-in wall-clock phases of one engine step: `engine.record_step_timings = True` makes
`LLMEngine.step()` fill `engine.step_timings` (seconds per phase of the last step).

Phases, in the order a step runs them: "schedule" (the scheduler picks the batch),
"prepare" (host metadata: positions, slot mappings, block tables, and their copy to the
device), "forward" (the model), "sample" (logits and sampling) and "postprocess" (token
bookkeeping, stop checks, outputs). A `mark(phase)` charges the time since the previous
mark to `phase`, so a phase may be entered more than once. On CUDA each mark first
synchronises the device, so a phase owns its kernels; that costs throughput, which is
why only a recording engine does it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")


class StepTimer:
    def __init__(self, device: str):
        self._cuda = torch.device(device).type == "cuda"
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._synchronize()
        self._last = time.perf_counter()

    def _synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def mark(self, phase: str) -> None:
        self._synchronize()
        now = time.perf_counter()
        self.timings[phase] += now - self._last
        self._last = now

    @contextlib.contextmanager
    def forward_of(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside: what runs before `model`'s forward is "prepare". A runner that replays a
        captured graph instead of calling the module marks "prepare" itself."""
        handle = model.register_forward_pre_hook(lambda *_: self.mark("prepare"))
        try:
            yield
        finally:
            handle.remove()


class NoStepTimer:
    """What a step uses when nothing records: marks cost one call."""

    def mark(self, phase: str) -> None:
        pass

    def forward_of(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


NO_STEP_TIMER = NoStepTimer()
