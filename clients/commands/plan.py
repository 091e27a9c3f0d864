"""`headwise plan {streaming,select,dynamic,show,import,ratio}`: make, inspect and re-threshold plans."""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from collections.abc import Callable

from headwise.clients.cli import CliError
from headwise.engine.config import DTYPES, KV_CACHE_DTYPES
from headwise.kvcache import plan_import
from headwise.kvcache.plan_build import (
    dynamic_full_count,
    dynamic_plan,
    head_capacities,
    kv_ratio,
    ratio_plan_name,
    rethreshold,
    select_plan,
    static_heads,
    streaming_plan,
)
from headwise.kvcache.plans import ModelShape, Plan, full_plan, load_plan, save_plan
from headwise.kvcache.request_blocks import decode_head_blocks

_LETTER = {"full": "F", "window": "W", "elastic": "E", "select": "S"}
# The context `plan streaming/import/ratio` quote their KV ratio at; `show --context` picks any.
SUMMARY_CONTEXT = 4096
# bytes per K/V element of each engine dtype, so `plan show` counts what `eval` reports
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="make, import, inspect and re-threshold compression plans")
    sub = parser.add_subparsers(dest="plan_command", required=True)

    p = sub.add_parser("streaming", help="every KV head keeps sink + recent tokens (StreamingLLM)")
    p.add_argument("--model", required=True, help="smollm2-135m, a .gguf file or a model directory")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--name", help="plan name (default streaming-SINK-RECENT)")
    p.set_defaults(func=_user_errors(_streaming))

    p = sub.add_parser("select", help="every KV head keeps sink + recent + selected middle tokens (SnapKV, Task-KV)")
    _select_args(p)
    p.add_argument("--name", help="plan name (default select-SINK-SELECT-RECENT)")
    p.set_defaults(func=_user_errors(_select))

    p = sub.add_parser(
        "dynamic",
        help="per request, the heads farthest from their layer's center stay full "
        "(Task-KV); the rest get a select budget",
    )
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of each layer's KV heads kept full")
    _select_args(p)
    p.add_argument("--name", help="plan name (default dynamic-PERCENT)")
    p.set_defaults(func=_user_errors(_dynamic))

    p = sub.add_parser(
        "show",
        help="per-layer kinds, slots and KV bytes of a plan (the blocks the engine holds once the prompt is processed)",
    )
    p.add_argument("plan", help="plan JSON")
    p.add_argument("--context", type=int, default=SUMMARY_CONTEXT, help="tokens per request (prompt + new)")
    p.add_argument("--prompt", type=int, help="prompt tokens, for elastic heads (default: --context)")
    dtype = p.add_mutually_exclusive_group()
    # no argparse default: with one, `--dtype float32 --dtype-bytes 2` would not conflict
    dtype.add_argument(
        "--dtype",
        choices=DTYPES,
        help="the engine's dtype, whose element size the bytes count (default float32, the engine's CPU default)",
    )
    dtype.add_argument("--dtype-bytes", type=int, help="bytes per K/V element (instead of --dtype)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="the engine's --kv-cache-dtype: auto counts --dtype's element size, fp8 / fp8_e4m3 / fp8_e5m2 1 byte",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--png", help="also draw a layers x kv heads map of slots per head")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="also print each tensor-parallel rank's KV bytes, head-balanced and contiguous",
    )
    p.set_defaults(func=_user_errors(_show))

    p = sub.add_parser("import", help="a plan from DuoAttention, Retrieval-Head or MoA head files")
    p.add_argument("format", choices=["duo", "retrieval-head", "moa"])
    p.add_argument("file", help='full_attention_heads.tsv (duo), {"L-H": [...]} JSON, or MoA JSON')
    p.add_argument("--model", required=True, help="smollm2-135m, a .gguf file or a model directory")
    p.add_argument(
        "--ratio",
        type=float,
        help="fraction of KV heads kept full (duo: 0.5 GQA / 0.25 MHA; "
        f"retrieval-head: {plan_import.RETRIEVAL_RATIO}; not for moa)",
    )
    p.add_argument("--sink", type=int, default=plan_import.DEFAULT_SINK)
    p.add_argument(
        "--recent", type=int, help=f"streaming heads' window (default {plan_import.DEFAULT_RECENT}; not for moa)"
    )
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--name")
    p.set_defaults(func=_user_errors(_import))

    p = sub.add_parser("ratio", help="re-threshold a plan's saved scores to another full-head ratio")
    p.add_argument("plan", help="plan JSON with scores (or a dynamic plan)")
    p.add_argument(
        "--ratio",
        type=float,
        required=True,
        help="fraction of KV heads kept full (moa plans: the mean attention-density bound)",
    )
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--name", help="plan name (default METHOD-PERCENT, e.g. duo-25)")
    p.set_defaults(func=_user_errors(_ratio))


def _user_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    # The shell prints CliError as one line; unreadable paths would otherwise be tracebacks.
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OSError as e:
            raise CliError(f"{e.filename or ''}: {e.strerror or e}") from None

    return run


def _model_shape(model: str) -> ModelShape:
    from headwise.engine.errors import ModelLoadError
    from headwise.engine.loader import model_shape  # imports torch: only when a command needs it

    try:
        return model_shape(model)
    except ModelLoadError as e:
        raise CliError(str(e)) from None


def _streaming(args: argparse.Namespace) -> int:
    plan = streaming_plan(_model_shape(args.model), args.sink, args.recent, args.name)
    return _write(plan, args.out)


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m, a .gguf file or a model directory")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--select", type=int, default=192, help="middle tokens kept per head")
    p.add_argument("--window", type=int, default=32, help="last prompt queries whose attention picks them")
    p.add_argument("--out", required=True, help="plan JSON to write")


def _select(args: argparse.Namespace) -> int:
    plan = select_plan(_model_shape(args.model), args.sink, args.recent, args.select, args.window, args.name)
    return _write(plan, args.out)


def _dynamic(args: argparse.Namespace) -> int:
    plan = dynamic_plan(
        _model_shape(args.model), args.ratio, args.sink, args.recent, args.select, args.window, args.name
    )
    return _write(plan, args.out)


def _import(args: argparse.Namespace) -> int:
    shape = _model_shape(args.model)
    if args.format == "moa":
        if args.ratio is not None or args.recent is not None:
            raise CliError("moa plans give every head its own elastic span: --ratio and --recent do not apply")
        plan = plan_import.import_moa(args.file, shape, args.sink, args.name)
    else:
        recent = plan_import.DEFAULT_RECENT if args.recent is None else args.recent
        if args.format == "duo":
            plan = plan_import.import_duo(args.file, shape, args.ratio, args.sink, recent, args.name)
        else:
            ratio = plan_import.RETRIEVAL_RATIO if args.ratio is None else args.ratio
            plan = plan_import.import_retrieval_head(args.file, shape, ratio, args.sink, recent, args.name)
    return _write(plan, args.out)


def _ratio(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    name = args.name or ratio_plan_name(plan.source.get("method") or plan.name, args.ratio)
    return _write(rethreshold(plan, args.ratio, name), args.out)


def _write(plan: Plan, out: str) -> int:
    save_plan(plan, out)
    heads = static_heads(plan)
    n_full = sum(s.kind == "full" for row in heads for s in row)
    what = "dynamic, " if plan.dynamic else ""
    print(
        f"wrote {out}: plan {plan.name!r}, {what}{n_full} of {plan.model.layers * plan.model.kv_heads} "
        f"kv heads full, KV {kv_ratio(plan, SUMMARY_CONTEXT):.3f}x of full at {SUMMARY_CONTEXT} tokens"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.context < 1 or args.block_size < 1 or (args.dtype_bytes is not None and args.dtype_bytes < 1):
        raise CliError("--context, --block-size and --dtype-bytes must be >= 1")
    dtype = args.dtype or "float32"
    elem, elem_name = (args.dtype_bytes, "") if args.dtype_bytes is not None else (DTYPE_BYTES[dtype], f"{dtype}, ")
    if args.kv_cache_dtype != "auto":
        if args.dtype_bytes is not None:
            raise CliError("--kv-cache-dtype and --dtype-bytes both set the bytes per element: give one")
        elem, elem_name = 1, f"kv cache {args.kv_cache_dtype}, "
    prompt = args.context if args.prompt is None else args.prompt
    if not 1 <= prompt <= args.context:
        raise CliError(f"--prompt must be in [1, --context {args.context}], got {prompt}")
    plan = load_plan(args.plan)
    m, heads = plan.model, static_heads(plan)
    caps = head_capacities(plan, args.context, args.prompt)
    # the blocks the engine holds at the request's decode peak, in the engine's block bytes
    block_bytes = 2 * args.block_size * m.head_dim * elem
    used, full = (
        (decode_head_blocks(p, prompt, args.context - prompt, args.block_size).sum(axis=1) * block_bytes).tolist()
        for p in (plan, full_plan(m))
    )
    print(
        f"plan {plan.name!r}: model {m.id or '?'} ({m.layers} layers x {m.kv_heads} kv heads, "
        f"{m.heads} heads, head_dim {m.head_dim}), source {plan.source.get('method', '?')}"
    )
    print(
        f"context {args.context} (prompt {args.prompt or args.context}), block {args.block_size}, "
        f"{elem_name}{elem} bytes/element; F full, W window, E elastic, S select"
    )
    if plan.dynamic:
        k, rest = dynamic_full_count(plan.dynamic.ratio, m.kv_heads), plan.dynamic.rest
        print(
            f"dynamic: per request the {k} of {m.kv_heads} kv heads of each layer farthest from its "
            f"center stay full, the rest select (sink {rest.sink}, recent {rest.recent}, select "
            f"{rest.select}, window {rest.window}); shown as the first heads of each layer"
        )
    width = max(5, 2 * m.kv_heads - 1)
    print(f"{'layer':>5}  {'kinds':<{width}}  {'heads x slots':<24} {'KV':>10} {'full':>10} {'ratio':>6}")
    for i, row in enumerate(heads):
        kinds = " ".join(_LETTER[s.kind] for s in row)
        slots = " ".join(f"{n}x{cap}" for cap, n in sorted(Counter(caps[i]).items(), reverse=True))
        print(
            f"{i:>5}  {kinds:<{width}}  {slots:<24} {_fmt_bytes(used[i]):>10} "
            f"{_fmt_bytes(full[i]):>10} {used[i] / full[i]:>6.3f}"
        )
    n_full = sum(s.kind == "full" for row in heads for s in row)
    ratio = sum(used) / sum(full)
    print(
        f"total: {n_full} of {m.layers * m.kv_heads} kv heads full, KV {_fmt_bytes(sum(used))} of "
        f"{_fmt_bytes(sum(full))} full per request = {ratio:.3f}x at {args.context} tokens"
    )
    if args.tp > 1:
        _show_ranks(
            plan,
            args.tp,
            args.context,
            args.block_size,
            decode_head_blocks(plan, prompt, args.context - prompt, args.block_size),
            block_bytes,
        )
    if args.png:
        _draw_map(plan, heads, caps, args.context, ratio, args.png)
        print(f"wrote {args.png}")
    return 0


def _show_ranks(plan: Plan, ranks: int, context: int, block_size: int, head_blocks, block_bytes: int) -> None:
    """Per-rank KV bytes of one request under head-balanced (as the engine shards for its
    default plan) and contiguous sharding."""
    from headwise.kvcache.sharding import ShardingError, balanced, contiguous, imbalance

    try:
        shardings = {
            "balanced": balanced(plan, ranks, context, block_size),
            "contiguous": contiguous(plan.model, ranks),
        }
    except ShardingError as e:
        raise CliError(str(e)) from None
    for name, s in shardings.items():
        per_rank = [
            int(sum(head_blocks[l][h] for l, row in enumerate(s.heads_of(r)) for h in row)) * block_bytes
            for r in range(ranks)
        ]
        print(
            f"tp {ranks} {name}: "
            + ", ".join(f"rank {r} {_fmt_bytes(b)}" for r, b in enumerate(per_rank))
            + f"; largest / mean {imbalance(per_rank):.3f}"
        )


def _draw_map(plan: Plan, heads: list, caps: list[list[int]], context: int, ratio: float, path: str) -> None:
    # A bare Figure renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    layers, kv_heads = plan.model.layers, plan.model.kv_heads
    fig = Figure(figsize=(min(3 + 0.6 * kv_heads, 20), min(2 + 0.25 * layers, 40)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(caps, cmap="viridis", vmin=0, vmax=context, aspect="auto", interpolation="nearest")
    for i, row in enumerate(heads):
        for j, spec in enumerate(row):
            # viridis is dark at the low end: white letters there, black on the bright full heads
            color = "white" if caps[i][j] < context / 2 else "black"
            ax.text(j, i, _LETTER[spec.kind], ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(kv_heads))
    ax.set_title(f"{plan.name}: slots per head at {context} tokens\nKV {ratio:.3f}x of full", fontsize=9)
    fig.colorbar(image, ax=ax, label="slots")
    fig.savefig(path, dpi=100)


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"
