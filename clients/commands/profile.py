"""`headwise profile {retrieval,moa,taskkv,duo}`: score every KV head offline, write a plan."""

from __future__ import annotations

import argparse
import time

from headwise.clients.cli import CliError

SUMMARY_CONTEXT = 4096  # the context the summary line quotes the KV ratio at, as `plan` does
REST_KINDS = ("select", "window")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("profile", help="profile a model's heads on offline data and write a plan")
    sub = parser.add_subparsers(dest="profile_command", required=True)

    p = sub.add_parser("retrieval", help="Retrieval Head copy-paste scores on needle-in-a-haystack prompts")
    _common(p, ratio=0.25)
    p.add_argument("--lengths", default="1024,2048", help="comma-separated prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=8, help="needle tests per length (depths spread 0-100%%)")
    _rest_args(p)
    p.set_defaults(func=_retrieval)

    p = sub.add_parser("moa", help="MoA: elastic sink + band rules from attention influence, chosen by a MILP")
    _common(p, ratio=None)
    p.add_argument("--density", type=float, default=0.5, help="bound on the mean attention density per length")
    p.add_argument("--lengths", default="1024,2048,4096", help="lengths the density bound holds at")
    p.add_argument(
        "--profile-length",
        type=int,
        default=1024,
        help="calibration text length the influence is measured at (scaled to --lengths)",
    )
    p.add_argument("--samples", type=int, default=4, help="calibration sequences per profiled length")
    p.add_argument(
        "--data",
        choices=["text", "needle"],
        default="needle",
        help="calibration: needle prompts in real text answered by the model (default: the "
        "long-range dependency the cache must keep), or text continued by the model",
    )
    p.add_argument("--generate", type=int, default=64, help="with --data text: tokens the model writes after each text")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--rules-per-layer", type=int, default=2)
    p.set_defaults(func=_moa)

    p = sub.add_parser("taskkv", help="Task-KV: heads far from their layer's semantic center stay full")
    _common(p, ratio=0.25)
    p.add_argument("--task", required=True, help='JSONL, one sample a line: {"prompt": TEXT} or {"prompt_ids": [...]}')
    p.add_argument("--samples", type=int, default=16, help="at most this many task samples")
    p.add_argument("--max-tokens", type=int, default=2048, help="prompts are cut to their last N tokens")
    _rest_args(p)
    p.set_defaults(func=_taskkv)

    p = sub.add_parser("duo", help="DuoAttention: trained full/streaming gates per KV head")
    _common(p, ratio=0.25)
    p.add_argument("--steps", type=int, default=None, help="AdamW steps (default 40)")
    p.add_argument("--length", type=int, default=None, help="training prompt length in tokens (default 768)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 0.05)")
    _rest_args(p)
    p.set_defaults(func=_duo)


def _common(p: argparse.ArgumentParser, ratio: float | None) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a model directory")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--name", help="plan name (default METHOD-PERCENT)")
    p.add_argument("--seed", type=int, default=0)
    if ratio is not None:
        p.add_argument("--ratio", type=float, default=ratio, help="fraction of KV heads kept full")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 is fastest on a busy machine, where extra threads spin-wait)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _rest_args(p: argparse.ArgumentParser) -> None:
    # defaults: what measured best at ratio 0.25 (docs/benchmarks.md, Profiled plans)
    p.add_argument(
        "--rest", choices=REST_KINDS, default="select", help="budget of the heads that are not full (default select)"
    )
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--select", type=int, default=256, help="middle tokens of select heads")
    p.add_argument("--window", type=int, default=32, help="observation window of select heads")


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--lengths {text!r}: expected comma-separated token counts like 1024,2048") from None
    if not lengths or any(n < 64 for n in lengths):
        raise CliError(f"--lengths {text!r}: every length must be at least 64 tokens")
    return list(dict.fromkeys(lengths))


def rest_spec(args: argparse.Namespace):
    from headwise.kvcache.plans import HeadSpec, PlanError, check_spec

    if args.rest == "window":
        spec = HeadSpec("window", sink=args.sink, recent=args.recent)
    else:
        spec = HeadSpec("select", sink=args.sink, recent=args.recent, select=args.select, window=args.window)
    try:
        check_spec(spec, "--rest")
    except PlanError as e:
        raise CliError(str(e)) from None
    return spec


def _check_ratio(args: argparse.Namespace) -> None:
    if not 0 <= args.ratio <= 1:
        raise CliError(f"--ratio must be in [0, 1], got {args.ratio}")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _load(args: argparse.Namespace):
    import torch

    from headwise.profilers.dense_forward import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model)


def _eos(cfg, tokenizer) -> set[int]:
    ids = set(cfg.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _retrieval(args: argparse.Namespace) -> int:
    from headwise.kvcache.plan_build import plan_from_scores, plan_source, ratio_plan_name, reduce_query_scores
    from headwise.profilers.retrieval import build_tests, retrieval_scores

    _check_ratio(args)
    _positive(args, "samples")
    lengths = parse_lengths(args.lengths)
    rest = rest_spec(args)
    start = time.perf_counter()
    cfg, model, tok = _load(args)
    tests = build_tests(tok, lengths, args.samples, args.seed)
    q_scores, n_correct = retrieval_scores(
        model, tests, lambda t, gen: t.answer in tok.decode(gen), _eos(cfg, tok), args.progress
    )
    scores = reduce_query_scores(q_scores.tolist(), cfg.num_kv_heads)
    params = {
        "lengths": lengths,
        "samples": args.samples,
        "seed": args.seed,
        "tests": len(tests),
        "correct": n_correct,
        "query_scores": [[round(v, 5) for v in row] for row in q_scores.tolist()],
    }
    plan = plan_from_scores(
        cfg.shape,
        scores,
        args.ratio,
        rest,
        args.name or ratio_plan_name("retrieval", args.ratio),
        plan_source("retrieval", params),
    )
    note = f"{n_correct} of {len(tests)} needle tests answered correctly"
    if n_correct == 0:
        note += " (none: scores averaged over all tests)"
    return _finish(plan, args.out, start, note)


def _moa(args: argparse.Namespace) -> int:
    from headwise.profilers.moa import profile_moa

    _positive(args, "samples", "generate", "profile_length", "rules_per_layer")
    if not 0 < args.density <= 1:
        raise CliError(f"--density must be in (0, 1], got {args.density}")
    if args.sink < 0:
        raise CliError(f"--sink must be >= 0, got {args.sink}")
    lengths = parse_lengths(args.lengths)
    start = time.perf_counter()
    cfg, model, tok = _load(args)
    plan, note = profile_moa(
        model,
        tok,
        lengths,
        args.density,
        args.profile_length,
        args.samples,
        args.generate,
        args.sink,
        args.rules_per_layer,
        args.seed,
        args.name,
        args.progress,
        args.data,
    )
    return _finish(plan, args.out, start, note)


def _taskkv(args: argparse.Namespace) -> int:
    from headwise.profilers.taskkv import profile_taskkv, read_task

    _check_ratio(args)
    _positive(args, "samples", "max_tokens")
    rest = rest_spec(args)
    start = time.perf_counter()
    cfg, model, tok = _load(args)
    prompts = read_task(args.task, tok, args.samples, args.max_tokens)
    plan, note = profile_taskkv(model, prompts, args.ratio, rest, args.window, args.name, args.task, args.progress)
    return _finish(plan, args.out, start, note)


def _duo(args: argparse.Namespace) -> int:
    from headwise.profilers import duo

    _check_ratio(args)
    _positive(args, "steps", "length")
    rest = rest_spec(args)
    start = time.perf_counter()
    cfg, model, tok = _load(args)
    steps, length = args.steps or duo.DEFAULT_STEPS, args.length or duo.DEFAULT_LENGTH
    plan, note = duo.profile_duo(
        model, tok, args.ratio, rest, steps, length, args.lr or duo.DEFAULT_LR, args.seed, args.name, args.progress
    )
    return _finish(plan, args.out, start, note)


def _finish(plan, out: str, start: float, note: str) -> int:
    from headwise.kvcache.plan_build import kv_ratio, static_heads
    from headwise.kvcache.plans import save_plan

    try:
        save_plan(plan, out)
    except OSError as e:
        raise CliError(f"{out}: {e.strerror or e}") from None
    heads = static_heads(plan)
    n_full = sum(s.kind == "full" for row in heads for s in row)
    total = plan.model.layers * plan.model.kv_heads
    print(
        f"profile {plan.source.get('method', '?')}: {n_full} of {total} kv heads full, KV "
        f"{kv_ratio(plan, SUMMARY_CONTEXT):.3f}x of full at {SUMMARY_CONTEXT} tokens; {note}; "
        f"wrote {out} ({plan.name!r}) in {time.perf_counter() - start:.0f} s"
    )
    return 0
