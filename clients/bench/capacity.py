"""`headwise bench capacity`: how many concurrent requests of one shape fit in a KV pool,
per plan, from the engine's block accounting (no model run). With --tensor-parallel-size N
the pool is each rank's and a request fits when it fits on its tightest rank: the plan's
heads sharded as the engine would (balanced by budgets), next to contiguous sharding."""

from __future__ import annotations

import argparse
import json

from headwise.clients.cli import CliError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("capacity", help="concurrent requests that fit in a KV pool, per plan")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a model directory")
    p.add_argument("--plan", action="append", default=[], metavar="NAME=PATH", help="plan to compare (repeatable)")
    p.add_argument("--kv-cache-mb", type=float, default=256.0, help="KV pool size in MiB")
    p.add_argument("--input-len", type=int, default=4096, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        default="auto",
        help="the pool's K/V element type: auto (--dtype) or fp8 (1 byte per element)",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk (the engine's step budget)")
    p.add_argument(
        "--select-margin",
        type=float,
        default=2.0,
        help="the engine's --select-margin: select heads prefill bounded (0: they hold the whole prompt)",
    )
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="ranks; --kv-cache-mb is each rank's pool"
    )
    p.add_argument("--json", action="store_true", help="print one JSON line per plan")
    p.set_defaults(func=run)


def capacity(
    plan,
    pool_blocks: int,
    input_len: int,
    output_len: int,
    block_size: int,
    chunk: int = 2048,
    sharding=None,
    margin: float = 2.0,
) -> dict:
    """Blocks per request and the requests that fit: all admitted at once (each holding its
    peak), and held while decoding with one request prefilling at a time. With `sharding`,
    per rank: the tightest rank decides. Select heads prefill bounded by `margin` (0: they
    hold the whole prompt and count as compacting in place: with the prefix cache the engine
    sets new blocks aside for them only when the pool has room)."""
    from headwise.kvcache.request_blocks import request_blocks

    order, ranks = (sharding.order, sharding.ranks) if sharding is not None else (None, 1)
    blocks = request_blocks(plan, input_len, output_len, block_size, chunk, False, margin, order, ranks).tolist()
    peak, end = max(b[0] for b in blocks), max(b[1] for b in blocks)
    at_once = min(pool_blocks // b[0] for b in blocks)
    decoding = min(0 if pool_blocks < b[0] else 1 + (pool_blocks - b[0]) // b[1] for b in blocks)
    row = {
        "plan": plan.name,
        "blocks_peak": peak,
        "blocks_decode": end,
        "pool_blocks": pool_blocks,
        "admitted_at_once": at_once,
        "held_decoding": decoding,
    }
    if sharding is not None:
        row |= {
            "tensor_parallel_size": sharding.ranks,
            "sharding": "contiguous" if sharding.is_contiguous else "balanced",
            "rank_blocks_decode": [b[1] for b in blocks],
        }
    return row


def run(args: argparse.Namespace) -> int:
    import torch

    from headwise.clients.engine_args import parse_plan_arg
    from headwise.engine.config import auto_dtype
    from headwise.engine.errors import ModelLoadError
    from headwise.engine.loader import model_shape
    from headwise.kernels.kv_quant import cache_dtype
    from headwise.kvcache.manager import KVCacheManager
    from headwise.kvcache.plans import load_plans
    from headwise.kvcache.sharding import ShardingError, balanced, check_divisible, contiguous

    if args.input_len < 1 or args.output_len < 1 or args.kv_cache_mb <= 0 or args.max_num_batched_tokens < 1:
        raise CliError("--input-len, --output-len, --kv-cache-mb and --max-num-batched-tokens must be positive")
    margin = args.select_margin
    if margin != 0 and not margin >= 1:
        raise CliError(f"--select-margin must be 0 (off) or >= 1, got {margin}")
    try:
        shape = model_shape(args.model)
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    plans = list(load_plans(dict(parse_plan_arg(v) for v in args.plan), shape).values())
    try:
        check_divisible(shape, args.tensor_parallel_size)
    except ShardingError as e:
        raise CliError(str(e)) from None
    if args.dtype == "auto":
        args.dtype = auto_dtype(args.device)
    kv_dtype = cache_dtype(args.kv_cache_dtype, getattr(torch, args.dtype))
    per_block = KVCacheManager.bytes_per_block(args.block_size, shape.head_dim, kv_dtype)
    pool = int(args.kv_cache_mb * 2**20 // per_block)
    rows = []
    for p in plans:
        shardings = [None]
        if args.tensor_parallel_size > 1:
            even = contiguous(shape, args.tensor_parallel_size)
            spread = balanced(p, args.tensor_parallel_size, args.input_len + args.output_len, args.block_size)
            shardings = [even] + ([spread] if spread.order != even.order else [])  # a full plan: the same
        rows += [
            capacity(p, pool, args.input_len, args.output_len, args.block_size, args.max_num_batched_tokens, s, margin)
            for s in shardings
        ]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(
        f"{args.kv_cache_mb:g} MiB pool = {pool} blocks of {args.block_size} slots ({args.dtype}"
        + (f", kv cache {args.kv_cache_dtype}" if args.kv_cache_dtype != "auto" else "")
        + f", select margin {margin:g}"
        + f"); requests of "
        f"{args.input_len} + {args.output_len} tokens"
    )
    for r in rows:
        if "sharding" in r:
            r["plan"] = f"{r['plan']} ({r['sharding']})"
    width = max(len(r["plan"]) for r in rows)
    per = " per rank" if args.tensor_parallel_size > 1 else ""
    print(
        f"{'plan':<{width}}  {'blocks peak' + per:>11}  {'blocks decode' + per:>13}  {'at once':>7}  "
        f"{'decoding':>8}  {'vs full':>7}"
    )
    base = rows[0]["held_decoding"] or 1
    for r in rows:
        print(
            f"{r['plan']:<{width}}  {r['blocks_peak']:>11}  {r['blocks_decode']:>13}  {r['admitted_at_once']:>7}  "
            f"{r['held_decoding']:>8}  {r['held_decoding'] / base:>6.2f}x"
        )
    return 0
