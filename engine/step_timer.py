"""Opt-in wall-clock phases of one engine step: `engine.record_step_timings = True` makes
`LLMEngine.step()` fill `engine.step_timings` (seconds per phase of the last step).

Phases, in the order a step runs them: "schedule" (the scheduler picks the batch),
"prepare" (host metadata and its copy to the device, block-table commits), "forward" (the
model, or the replay of a captured decode graph), "sample" (the lm_head rows that sample,
and sampling) and "postprocess" (token bookkeeping, stop checks, outputs). A `mark(phase)`
charges the time since the previous mark to `phase`, so a phase may be entered more than
once; `ModelRunner.execute` marks "prepare" just before the model runs. On CUDA each mark
first synchronises the device, so a phase owns its kernels; that costs throughput, which
is why only a recording engine does it.
"""

from __future__ import annotations

import time

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


class NoStepTimer:
    """What a step uses when nothing records: marks cost one call."""

    def mark(self, phase: str) -> None:
        pass


NO_STEP_TIMER = NoStepTimer()
