"""Running a batch of prompts to completion on the step loop (LLMEngine.generate)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from headwise.engine.outputs import RequestOutput
from headwise.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine calls these; importing it here would be a cycle
    from headwise.engine.llm_engine import LLMEngine


def generate_all(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    plans: list[str] | str | None = None,
    use_tqdm: bool = False,
) -> list[RequestOutput]:
    """Run prompts to completion together; outputs in input order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    plan_list = plans if isinstance(plans, list) else [plans] * len(prompts)
    base = f"gen-{time.monotonic_ns()}"
    ids = [f"{base}-{i}" for i in range(len(prompts))]
    for rid, prompt, p, plan in zip(ids, prompts, params_list, plan_list):
        engine.add_request(rid, prompt, p, plan)
    done: dict[str, RequestOutput] = {}
    bar = None
    if use_tqdm:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="req")
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished and out.request_id in ids:
                done[out.request_id] = out
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return [done[i] for i in ids]
