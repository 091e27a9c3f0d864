"""`headwise bench latency`: the latency of one batch (vLLM's benchmark_latency).

B random prompts of N tokens (seeded, fresh ones every iteration) go in at once, greedy
with `ignore_eos`, M tokens out each; warm-up iterations, then measured ones. Per
iteration: prefill time (until every request has its first token), decode ms per step
(the M - 1 steps after), output tok/s (B x M over the whole iteration); printed as mean,
p50 and p90. One more iteration records `LLMEngine.step_timings` and breaks the mean
decode step into its phases (schedule / prepare / forward / sample / postprocess); it is
kept out of the figures above because recording synchronises the device between phases.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from headwise.clients.bench.offline import make_prompts
from headwise.clients.cli import CliError
from headwise.clients.engine_args import add_engine_args, engine_config_from_args

FIGURES = ("latency_s", "prefill_s", "decode_ms_per_step", "decode_tok_s", "output_tok_s")


@dataclass
class Iteration:
    latency_s: float
    prefill_s: float
    decode_ms_per_step: float
    decode_tok_s: float
    output_tok_s: float
    peak_num_running: int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("latency", help="latency of one batch: prefill, decode ms/step, phases of a step")
    p.add_argument("--batch-size", type=int, default=8, help="prompts sent at once")
    p.add_argument("--input-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt (>= 2)")
    p.add_argument("--num-iters-warmup", type=int, default=1, help="iterations run before measuring")
    p.add_argument("--num-iters", type=int, default=3, help="measured iterations")
    p.add_argument("--kv-plan", default=None, help="plan for every request (default: the default plan)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH")
    add_engine_args(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    for flag, minimum in (
        ("batch_size", 1),
        ("input_len", 1),
        ("output_len", 2),
        ("num_iters", 1),
        ("num_iters_warmup", 0),
    ):
        if getattr(args, flag) < minimum:
            raise CliError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {getattr(args, flag)}")
    if args.batch_size > args.max_num_seqs:
        raise CliError(
            f"--batch-size {args.batch_size} exceeds --max-num-seqs {args.max_num_seqs}: the batch "
            "would not run at once"
        )


def run_iteration(
    engine,
    prompts: list[list[int]],
    output_len: int,
    plan: str | None,
    tag: str,
    step_timings: list[dict[str, float]] | None = None,
) -> Iteration:
    """One batch from submission to its last token; with `step_timings`, the engine's phase
    timings of every decode step are appended to it."""
    from headwise.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    started: set[str] = set()
    prefill_end = None
    decode_steps = peak = 0
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"latency-{tag}-{i}", prompt, params, plan)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        peak = max(peak, engine.stats().num_running)
        if prefill_end is not None:
            decode_steps += 1
            if step_timings is not None:
                step_timings.append(dict(engine.step_timings))
            continue
        started.update(o.request_id for o in outputs if o.token_ids)
        if len(started) == len(prompts):
            prefill_end = now
    end = time.perf_counter()
    decode_s = end - prefill_end
    return Iteration(
        latency_s=end - t0,
        prefill_s=prefill_end - t0,
        decode_ms_per_step=1000 * decode_s / decode_steps,
        decode_tok_s=len(prompts) * decode_steps / decode_s,
        output_tok_s=len(prompts) * output_len / (end - t0),
        peak_num_running=peak,
    )


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
    }


def mean_phases(step_timings: list[dict[str, float]]) -> dict[str, float]:
    """Milliseconds of each phase in the mean decode step, and their total."""
    from headwise.engine.step_timer import PHASES

    phases = {p: 1000 * float(np.mean([t[p] for t in step_timings])) for p in PHASES}
    return phases | {"total": sum(phases.values())}


def run(args: argparse.Namespace) -> int:
    from headwise.engine.llm_engine import LLMEngine

    check_args(args)
    engine = LLMEngine(engine_config_from_args(args))
    vocab = engine.model_config.vocab_size
    counter = iter(range(args.seed, args.seed + 1_000_000))

    def iteration(tag: str, step_timings=None) -> Iteration:
        prompts = make_prompts(args.batch_size, args.input_len, args.input_len, vocab, next(counter))
        return run_iteration(engine, prompts, args.output_len, args.kv_plan, tag, step_timings)

    for i in range(args.num_iters_warmup):
        iteration(f"warmup{i}")
    measured = [iteration(f"iter{i}") for i in range(args.num_iters)]
    step_timings: list[dict[str, float]] = []
    engine.record_step_timings = True
    try:
        iteration("phases", step_timings)
    finally:
        engine.record_step_timings = False
    result = {
        "model": engine.model_id,
        "device": args.device,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters_warmup": args.num_iters_warmup,
        "num_iters": args.num_iters,
    }
    result |= {f: summarize([getattr(it, f) for it in measured]) for f in FIGURES}
    result |= {
        "peak_num_running": max(it.peak_num_running for it in measured),
        "step_breakdown_ms": mean_phases(step_timings),
        "step_breakdown_steps": len(step_timings),
        "iterations": [asdict(it) for it in measured],
    }
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def format_report(r: dict) -> str:
    lines = [
        f"bench latency: {r['model']} on {r['device']} ({r['dtype']}, {r['load_format']} weights), "
        f"batch {r['batch_size']} x {r['input_len']} tokens in, {r['output_len']} out; "
        f"{r['num_iters']} measured iteration{'s' * (r['num_iters'] != 1)} after {r['num_iters_warmup']} "
        "warm-up",
        f"{'':<20}{'mean':>10}{'p50':>10}{'p90':>10}",
    ]
    for label, key, fmt in (
        ("latency s", "latency_s", ".3f"),
        ("prefill s", "prefill_s", ".3f"),
        ("decode ms/step", "decode_ms_per_step", ".2f"),
        ("decode tok/s", "decode_tok_s", ".1f"),
        ("output tok/s", "output_tok_s", ".1f"),
    ):
        lines.append(f"{label:<20}" + "".join(f"{r[key][s]:>10{fmt}}" for s in ("mean", "p50", "p90")))
    phases = r["step_breakdown_ms"]
    lines.append(
        f"one decode step, mean of {r['step_breakdown_steps']} recorded steps (device synchronised "
        f"between phases): {phases['total']:.2f} ms"
    )
    for name, ms in phases.items():
        if name != "total":
            lines.append(f"  {name:<12}{ms:>9.3f} ms {100 * ms / phases['total']:>6.1f}%")
    if r["peak_num_running"] < r["batch_size"]:
        lines.append(
            f"warning: at most {r['peak_num_running']} of {r['batch_size']} requests ran at once "
            "(KV pool too small?): the decode figures mix in prefills"
        )
    lines.append(
        f"latency: {r['output_tok_s']['mean']:.1f} output tok/s, decode {r['decode_ms_per_step']['mean']:.2f} "
        f"ms/step ({r['decode_tok_s']['mean']:.1f} tok/s), prefill {r['prefill_s']['mean']:.3f} s"
    )
    return "\n".join(lines)
