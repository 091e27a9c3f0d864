"""`headwise eval`: accuracy, perplexity and agreement with the full cache, next to KV bytes."""

from __future__ import annotations

import argparse
import platform
import time

from headwise.clients.engine_args import add_engine_args, engine_config_from_args
from headwise.clients.eval.harness import evaluate, format_table, summarize, write_json
from headwise.synthetic.prompts import FORMATS
from headwise.synthetic.tasks import KEY_KINDS, MAX_TOKENS, TASKS

DEFAULT_LENGTHS = "1024,2048,4096"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy and KV memory of plans on offline long-context tasks",
        description="Runs passkey, RULER-style needle tasks, variable tracking and perplexity through the "
        "engine for every plan (and the full cache), and reports accuracy, greedy agreement "
        "with the full cache, and KV bytes per request.",
    )
    add_engine_args(parser)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated prompt lengths in tokens")
    parser.add_argument("--samples", type=int, default=5, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="plain",
        help="plain: text continuation after an answer prefix (default, best for small "
        "models); chat: the model's chat template",
    )
    parser.add_argument("--keys", choices=KEY_KINDS, default="words", help="needle keys")
    parser.add_argument("--json", dest="json_path", help="also write rows and config to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    # the engine imports torch and loads weights: only after the arguments are known good
    from headwise.engine.llm_engine import LLMEngine

    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    start = time.perf_counter()
    rows = evaluate(engine, tasks, lengths, args.samples, args.seed, args.format, args.keys)
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    if args.json_path:
        run_config = {
            "model": config.model,
            "dtype": config.dtype,
            "kv_cache_dtype": config.kv_cache_dtype,
            "plans": {"full": None, **config.plans},
            "tasks": tasks,
            "lengths": lengths,
            "samples": args.samples,
            "seed": args.seed,
            "format": args.format,
            "keys": args.keys,
            "max_tokens": {t: MAX_TOKENS[t] for t in tasks},
            # the ppl corpus and natural haystacks are the running Python's pydoc topics
            "python": platform.python_version(),
            "elapsed_s": round(elapsed, 3),
        }
        write_json(args.json_path, rows, run_config)
    print(summarize(rows, elapsed))
    return 0


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(
            f"--tasks {text!r}: unknown task {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}"
        )
    return list(dict.fromkeys(tasks))


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {text!r}: expected comma-separated token counts like {DEFAULT_LENGTHS}") from None
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"--lengths {text!r}: every length must be a positive token count")
    return list(dict.fromkeys(lengths))
