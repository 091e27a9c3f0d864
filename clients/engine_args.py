"""Engine flags shared by every command; each also reads HEADWISE_<FLAG> from the environment."""

from __future__ import annotations

import argparse
import os

from headwise.clients.cli import CliError
from headwise.engine.config import DTYPE_CHOICES, KV_CACHE_DTYPES, LOAD_FORMATS, EngineConfig
from headwise.kvcache.plans import PlanError, load_plan
from headwise.kvcache.shipped_plans import shipped_plans

# engine.loader.DEFAULT_MODEL; importing the loader would pull torch into `headwise --help`
DEFAULT_MODEL = "smollm2-135m"


def env_default(flag: str, default=None, cast=str):
    """Default of `--flag` from HEADWISE_FLAG (dashes become underscores)."""
    name = "HEADWISE_" + flag.lstrip("-").replace("-", "_").upper()
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError as e:
        raise SystemExit(f"headwise: error: environment {name}={value!r}: {e}")  # noqa: B904


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_plan_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=env_default("--model", DEFAULT_MODEL),
        help="smollm2-135m, a .gguf file or a Hugging Face model directory",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=env_default("--dtype", "float32"),
        help="auto: bfloat16 on a GPU and on CPUs with AVX512-BF16 or AMX, else float32 (default float32)",
    )
    g.add_argument("--device", default=env_default("--device", "cpu"))
    g.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=env_default("--kv-cache-dtype", "auto"),
        help="K/V element type in the pool: auto (the model's --dtype), fp8 (= fp8_e4m3) or fp8_e5m2, "
        "1 byte per element with a scale per (layer, KV head)",
    )
    g.add_argument(
        "--kv-scales",
        metavar="FILE",
        default=env_default("--kv-scales", None),
        help="fp8 scales per (layer, KV head) as JSON (headwise-kv-scales/1); default: calibrated from the "
        "first prompt's K/V absmax (x4 headroom; values beyond saturate)",
    )
    g.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default=env_default("--load-format", "auto"),
        help="auto: read the checkpoint; dummy: random weights from config.json alone (benchmarks)",
    )
    g.add_argument(
        "--kv-cache-mb",
        type=float,
        default=env_default("--kv-cache-mb", None, float),
        help="KV pool size in MiB (default 1024)",
    )
    g.add_argument(
        "--num-blocks",
        type=int,
        default=env_default("--num-blocks", None, int),
        help="KV pool size in blocks (overrides --kv-cache-mb)",
    )
    g.add_argument("--block-size", type=int, default=env_default("--block-size", 16, int))
    g.add_argument("--max-num-seqs", type=int, default=env_default("--max-num-seqs", 64, int))
    g.add_argument("--max-num-batched-tokens", type=int, default=env_default("--max-num-batched-tokens", 2048, int))
    g.add_argument("--max-model-len", type=int, default=env_default("--max-model-len", None, int))
    g.add_argument(
        "--select-margin",
        type=float,
        default=env_default("--select-margin", 2.0, float),
        help="select heads prefill with a bounded peak, keeping this many times their select budget as "
        "candidates between prompt chunks (>= 1); 0: they hold the whole prompt until it ends (default 2)",
    )
    env_plans = [parse_plan_arg(p) for p in (env_default("--plan", "") or "").split(",") if p]
    g.add_argument(
        "--plan",
        action="append",
        type=parse_plan_arg,
        default=env_plans or None,
        metavar="NAME=PATH",
        help="load a compression plan (repeatable); 'full' always exists; a NAME of a shipped plan replaces it",
    )
    shipped = ", ".join(shipped_plans(DEFAULT_MODEL)) or "none"
    g.add_argument(
        "--no-shipped-plans",
        dest="shipped_plans",
        action="store_false",
        default=not env_default("--no-shipped-plans", False, _flag),
        help=f"do not load the plans shipped for --model {DEFAULT_MODEL} ({shipped})",
    )
    g.add_argument("--default-plan", default=env_default("--default-plan", "full"))
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=env_default("--enable-prefix-caching", True, _flag),
        help="reuse the KV of shared prompt prefixes, per head (default on)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=env_default("--tensor-parallel-size", 1, int),
        help="split the model over N processes, one device each (KV heads balanced by the default "
        "plan's budgets); under torchrun, its WORLD_SIZE",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        default=env_default("--enforce-eager", False, _flag),
        help="run decode steps eagerly instead of replaying CUDA graphs",
    )


def plans_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The model's shipped plans (unless --no-shipped-plans), then each --plan NAME=PATH,
    every file read and checked now: a bad one is a one-line error before weights load."""
    plans = shipped_plans(args.model) if args.shipped_plans else {}
    plans.update(dict(args.plan or []))
    for name, path in plans.items():
        check_plan_file(name, path)
    if args.default_plan != "full" and args.default_plan not in plans:
        raise CliError(f"--default-plan {args.default_plan!r} is not loaded (loaded: {', '.join(['full', *plans])})")
    return plans


def check_plan_file(name: str, path: str) -> None:
    """Refuse a plan file that is missing, unreadable or malformed; whether it fits the
    model's shape is checked when the model's config is read."""
    try:
        load_plan(path)
    except PlanError as e:  # its message starts with the path
        raise CliError(f"plan {name!r}: {e}") from None
    except OSError as e:
        raise CliError(f"plan {name!r}: {path}: {e.strerror or e}") from None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The engine's config; `--dtype auto` is resolved and written back to `args.dtype`, so a
    command's report and its baseline (bench offline's transformers) name the dtype that ran."""
    plans = plans_from_args(args)
    if args.kv_scales is not None and args.kv_cache_dtype == "auto":
        raise CliError("--kv-scales needs --kv-cache-dtype fp8, fp8_e4m3 or fp8_e5m2")
    if args.kv_scales is not None and not os.path.isfile(args.kv_scales):
        raise CliError(f"--kv-scales {args.kv_scales}: no such file")
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        block_size=args.block_size,
        kv_cache_mb=args.kv_cache_mb,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        plans=plans,
        default_plan=args.default_plan,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_scales=args.kv_scales,
        select_margin=args.select_margin,
    )
    args.dtype = config.dtype
    return config
