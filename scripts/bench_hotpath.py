"""Host hot path of a decode step, two source trees side by side in one run.

Measures on the CPU, for each tree (e.g. a `git archive` of the base commit and this
checkout), in alternating subprocesses so load drift hits both alike:
- sampler: ms per sampler call for B = 1, 8, 32 rows of the default model's vocabulary
  (greedy; greedy with 5 logprobs; seeded temperature 0.8 + top-k 50 + top-p 0.9), and for
  a tree with a batched sampler also the time to draw the seeded rows' noise, which that
  sampler does off the critical path;
- engine: decode ms/step of the default model at batch 1, 8 and 32 (32-token prompts, greedy),
  and at 32 with seeded temperature 0.8 + top-k 50 + top-p 0.9; wall time and the
  process's CPU time per step (steadier on a shared machine);
- ops: aten ops and Triton launches in one decode step at batch 1 with
  HEADWISE_KERNELS=triton under TRITON_INTERPRET=1 (what a GPU would launch), per step and
  inside one decoder layer; view / allocation ops that launch nothing are not counted.

Usage:
  git archive <base> | tar -x -C /tmp/base
  python scripts/bench_hotpath.py --tree base=/tmp/base --tree new=. [--rounds 2]
  python scripts/bench_hotpath.py --tree 4k=. --tree thp=. --tree-env 4k=THP_MEM_ALLOC_ENABLE=0 \
      --tree-env thp=THP_MEM_ALLOC_ENABLE=1 --only engine
One torch thread per process; prints a table per measurement and a one-line summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

SUBPACKAGES = ("kernels", "kvcache", "engine", "synthetic", "server", "profilers", "clients", "loadtest")
# ops that only make views or allocate: no kernel on a GPU
NO_LAUNCH = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::slice",
    "aten::select",
    "aten::as_strided",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::split",
    "aten::split_with_sizes",
    "aten::chunk",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resize_",
    "aten::detach",
    "aten::alias",
    "aten::unbind",
    "aten::narrow",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::to",
    "aten::contiguous",
    "aten::numpy_T",
    "aten::_unsafe_view",
    "aten::unflatten",
    "aten::flatten",
    "aten::view_as",
    "aten::expand_as",
    "aten::type_as",
    "aten::is_nonzero",
    "aten::detach_",
    "aten::set_",
    "aten::item",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::_local_scalar_dense",
    "aten::dim",
    "aten::size",
    "aten::stride",
}
VOCAB_FALLBACK = 49152


def use_tree(root: Path) -> None:
    """Import `headwise.<sub>` from `root/<sub>` instead of the installed checkout."""
    pkg = types.ModuleType("headwise")
    pkg.__path__ = []
    sys.modules["headwise"] = pkg
    for name in SUBPACKAGES:
        init = root / name / "__init__.py"
        if not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(
            f"headwise.{name}", init, submodule_search_locations=[str(root / name)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        setattr(pkg, name, mod)


# -- sampler ------------------------------------------------------------------------------
def _seqs(n: int, params):
    import torch

    from headwise.engine.sequence import Sequence

    return [
        Sequence(
            request_id=f"r{i}",
            prompt_token_ids=list(range(100, 132)),
            params=params,
            plan=None,
            generator=torch.Generator().manual_seed(i),
            output_token_ids=list(range(200, 216)),
        )
        for i in range(n)
    ]


def bench_sampler(reps: int) -> dict:
    import torch

    from headwise.engine import sampler as sampler_mod
    from headwise.engine.sampling_params import SamplingParams

    configs = {
        "greedy": SamplingParams(temperature=0),
        "greedy+logprobs5": SamplingParams(temperature=0, logprobs=5),
        "seeded top-k/top-p": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
    }
    batched = hasattr(sampler_mod, "Sampler")
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, params in configs.items():
        for b in (1, 8, 32):
            logits = torch.randn(b, VOCAB_FALLBACK, generator=gen) * 4
            times, noise_times = [], []
            for _ in range(reps + 1):
                seqs = _seqs(b, params)
                x = logits.clone()
                if batched:
                    s = sampler_mod.Sampler(VOCAB_FALLBACK, (0,), "cpu")
                    t0 = time.perf_counter()
                    s.prefetch_noise(seqs)
                    for seq in seqs:
                        if seq.noise is not None:
                            seq.noise.result()
                    t1 = time.perf_counter()
                    s.sample(x, seqs)
                    t2 = time.perf_counter()
                    noise_times.append(t1 - t0)
                else:
                    t1 = time.perf_counter()
                    tokens, lps = sampler_mod.sample(x, seqs, (0,))
                    for i, seq in enumerate(seqs):
                        if seq.params.logprobs is not None:
                            sampler_mod.token_logprob(lps[i], tokens[i], seq.params.logprobs)
                    t2 = time.perf_counter()
                times.append(t2 - t1)
            out[f"{name} B={b}"] = {
                "sample_ms": 1e3 * statistics.median(times[1:]),
                "noise_ms": 1e3 * statistics.median(noise_times[1:]) if noise_times else None,
            }
    return out


# -- engine ------------------------------------------------------------------------------
def _decoding_engine(batch: int, steps: int, seeded: bool = False):
    import torch

    from headwise.engine.config import EngineConfig
    from headwise.engine.llm_engine import LLMEngine
    from headwise.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(kv_cache_mb=256, max_num_seqs=max(batch, 1)))
    gen = torch.Generator().manual_seed(0)
    knobs = dict(temperature=0.8, top_k=50, top_p=0.9, seed=1) if seeded else dict(temperature=0)
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True, **knobs)
    for i in range(batch):
        engine.add_request(f"b{i}", torch.randint(100, 20000, (32,), generator=gen).tolist(), params)
    while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def bench_engine(steps: int) -> dict:
    """Median wall ms and CPU ms (all threads of the process) per decode step; CPU time
    is what the step costs, and moves less than wall time when other work shares the cores."""
    out = {}
    for name, b, seeded in (("B=1", 1, False), ("B=8", 8, False), ("B=32", 32, False), ("B=32 seeded", 32, True)):
        engine = _decoding_engine(b, steps, seeded)
        wall, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            engine.step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[name] = 1e3 * statistics.median(wall[2:])
        out[name + " cpu"] = 1e3 * statistics.median(cpu[2:])
    return out


def bench_ops() -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HEADWISE_KERNELS"] = "triton"
    import torch
    from torch.autograd.profiler import record_function
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self, "fn") else "triton")
        with record_function("triton_launch"):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = counted_run
    engine = _decoding_engine(1, 4)
    layer = engine.model.layers[1]
    ranges = []
    layer.register_forward_pre_hook(lambda m, a: ranges.append(record_function("layer1").__enter__()))
    layer.register_forward_hook(lambda m, a, o: ranges.pop().__exit__(None, None, None))
    launches.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.step()
    events = prof.events()
    skip = [e.time_range for e in events if e.name == "triton_launch"]
    layer_range = next(e.time_range for e in events if e.name == "layer1")

    def inside(e, r) -> bool:
        return r.start <= e.time_range.start and e.time_range.end <= r.end

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    def works(e) -> bool:
        return e.name not in NO_LAUNCH or any(works(c) for c in e.cpu_children if c.name.startswith("aten::"))

    leaves = [
        e
        for e in events
        if e.name.startswith("aten::") and outermost(e) and works(e) and not any(inside(e, r) for r in skip)
    ]
    in_layer = [e for e in leaves if inside(e, layer_range)]
    tri_in_layer = sum(1 for e in events if e.name == "triton_launch" and inside(e, layer_range))
    counts: dict[str, int] = {}
    for e in in_layer:
        counts[e.name] = counts.get(e.name, 0) + 1
    return {
        "step_aten": len(leaves),
        "step_triton": len(launches),
        "layer_aten": len(in_layer),
        "layer_triton": tri_in_layer,
        "layer_ops": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }


def child(tree: str, what: str, reps: int) -> None:
    use_tree(Path(tree).resolve())
    import torch

    torch.set_num_threads(1)
    result = {"sampler": lambda: bench_sampler(reps), "engine": lambda: bench_engine(24), "ops": bench_ops}[what]()
    print(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR of a headwise source tree")
    ap.add_argument(
        "--tree-env",
        action="append",
        default=[],
        help="NAME=VAR=VALUE: set VAR in tree NAME's processes (e.g. the same tree twice, THP_MEM_ALLOC_ENABLE=0 / 1)",
    )
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per measurement")
    ap.add_argument("--reps", type=int, default=5, help="sampler calls per cell")
    ap.add_argument("--only", choices=["sampler", "engine", "ops"], action="append")
    ap.add_argument("--json-out", help="write every round's numbers here")
    ap.add_argument("--child", nargs=2, metavar=("TREE", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.reps)
        return 0
    trees = dict(t.split("=", 1) for t in args.tree)
    results: dict[str, dict[str, list[dict]]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tree_env: dict[str, dict[str, str]] = {}
    for spec in args.tree_env:
        name, var, value = spec.split("=", 2)
        tree_env.setdefault(name, {})[var] = value
    for what in args.only or ["sampler", "engine", "ops"]:
        rounds = 1 if what == "ops" else args.rounds
        for _ in range(rounds):
            for name, tree in trees.items():
                proc = subprocess.run(
                    [sys.executable, __file__, "--reps", str(args.reps), "--child", tree, what],
                    capture_output=True,
                    text=True,
                    env=env | tree_env.get(name, {}),
                )
                if proc.returncode:
                    sys.exit(f"{what} on {name} failed:\n{proc.stderr[-3000:]}")
                results.setdefault(what, {}).setdefault(name, []).append(json.loads(proc.stdout.splitlines()[-1]))
    names = list(trees)
    if "sampler" in results:
        print("sampler ms per call (median of the rounds' medians)")
        r = results["sampler"]
        for cell in r[names[0]][0]:
            row = [f"{cell:28s}"]
            for n in names:
                row.append(f"{n} {statistics.median(x[cell]['sample_ms'] for x in r[n]):8.2f}")
                noise = [x[cell]["noise_ms"] for x in r[n] if x[cell]["noise_ms"] is not None]
                if noise:
                    row.append(f"(noise {statistics.median(noise):7.2f})")
            print("  ".join(row))
    if "engine" in results:
        print("engine decode ms/step (median of the rounds' medians)")
        r = results["engine"]
        for cell in r[names[0]][0]:
            vals = [statistics.median(x[cell] for x in r[n]) for n in names]
            ratio = f"  {names[0]}/{names[-1]} {vals[0] / vals[-1]:.2f}x" if len(names) > 1 else ""
            rounds = "  rounds: " + "; ".join(f"{n} " + " ".join(f"{x[cell]:.1f}" for x in r[n]) for n in names)
            print(f"{cell:12s} " + "  ".join(f"{n} {v:8.2f}" for n, v in zip(names, vals)) + ratio + rounds)
    if "ops" in results:
        print("ops per decode step at B=1 (aten compute ops + Triton launches)")
        for n in names:
            o = results["ops"][n][0]
            print(
                f"{n}: step {o['step_aten']} aten + {o['step_triton']} triton; one layer {o['layer_aten']} aten + "
                f"{o['layer_triton']} triton: {o['layer_ops']}"
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    print(f"summary: {len(names)} trees, " + ", ".join(f"{w} x {len(r[names[0]])} rounds" for w, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
