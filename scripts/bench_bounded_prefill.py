"""Prefill and decode time of retrieval-20, bounded prefill (--select-margin 2) vs the whole-prompt
path (0): two engines in one process, one random prompt per run sent to each in turn; prints each
run's figures and the median ratios. Usage: python scripts/bench_bounded_prefill.py IN OUT RUNS
(docs/benchmarks.md ran 4096 16 3)."""

import statistics
import sys
import time

import torch

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.shipped_plans import shipped_plans

n_in, n_out, runs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
plans = {k: v for k, v in shipped_plans("smollm2-135m").items() if k != "streaming"}
engines = {m: LLMEngine(EngineConfig(plans=plans, select_margin=m, enable_prefix_caching=False)) for m in (2.0, 0.0)}
res = {m: [] for m in engines}
g = torch.Generator().manual_seed(0)
for i in range(runs):
    prompt = torch.randint(0, 49000, (n_in,), generator=g).tolist()
    for m, eng in engines.items():
        eng.add_request(
            f"r{i}", prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True), "retrieval-20"
        )
        t0 = time.perf_counter()
        first = None
        steps = 0
        while eng.has_unfinished_requests():
            outs = eng.step()
            if first is None and outs:
                first = time.perf_counter()
            elif outs:
                steps += 1
        end = time.perf_counter()
        res[m].append((first - t0, (end - first) / max(steps, 1) * 1000))
        print(
            f"run {i} margin {m:g}: prefill {first - t0:.2f} s, decode {(end - first) / max(steps, 1) * 1000:.1f} ms/step",
            flush=True,
        )
pre = [a[0] / b[0] for a, b in zip(res[2.0], res[0.0])]
dec = [a[1] / b[1] for a, b in zip(res[2.0], res[0.0])]
print(
    f"median prefill bounded/whole {statistics.median(pre):.3f} (runs {', '.join(f'{x:.3f}' for x in pre)}); "
    f"median decode {statistics.median(dec):.3f} (runs {', '.join(f'{x:.3f}' for x in dec)})"
)
