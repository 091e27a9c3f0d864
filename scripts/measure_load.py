"""Time and host-memory peak of loading a model, one JSON line per run; and a random
checkpoint in Hugging Face names for shapes that have no weights to download.

    python scripts/measure_load.py measure --model smollm2-135m [--dtype float32] [--device cpu]
    python scripts/measure_load.py write-checkpoint --config DIR --out DIR [--shard-gb 4]

`measure` runs in a fresh process per call so its high-water RSS (VmHWM, which counts the
pages of a memory-mapped checkpoint while they are mapped) belongs to one load; the tokenizer is loaded once before the clock starts (transformers' imports take
seconds); it calls `headwise.engine.llm_engine.load_model(model, dtype, device)`, whose
signature predates streaming, so PYTHONPATH pointing at an older install measures that
version in the same run. `write-checkpoint` writes bf16 normal(0, 0.02) tensors of the
config's shape, sharded with a `model.safetensors.index.json`, plus the config and any
tokenizer files of DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """VmHWM, the high-water RSS of this process's memory; not ru_maxrss, which starts from
    the parent's RSS when the parent (v)forked us."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def measure(args: argparse.Namespace) -> None:
    import torch
    from safetensors import torch as _  # noqa: F401

    import headwise.engine.llm_engine as engine
    from headwise.engine.loader import load_tokenizer, resolve_model_dir

    kw = {"load_format": args.load_format} if args.load_format != "auto" else {}
    # the tokenizer once up front: transformers' lazy imports (seconds, ~100 MB) are not the load's
    load_tokenizer(resolve_model_dir(args.model))
    if torch.device(args.device).type == "cuda":
        torch.zeros(1, device=args.device)  # the CUDA context's host memory is not the load's either
    before = rss_mb()
    t = time.perf_counter()
    _, model, _ = engine.load_model(args.model, args.dtype, args.device, **kw)  # noqa: F811
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        json.dumps(
            {
                "model": args.model,
                "dtype": args.dtype,
                "device": args.device,
                "load_s": round(seconds, 3),
                "rss_before_mb": round(before),
                "peak_rss_mb": round(peak),
                "peak_over_before_mb": round(peak - before),
                "weights_mb": round(weights_mb),
                "code": engine.__file__,
            }
        )
    )


def write_checkpoint(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from headwise.engine.loader import read_config
    from headwise.engine.weights import DUMMY_STD, build_model

    src, out = Path(args.config), Path(args.out)
    cfg = read_config(src)
    meta = build_model(cfg, torch.bfloat16, "meta")
    params = dict(meta.named_parameters())
    shapes = {}
    for name, slot in meta.hf_slots().items():
        shape = list(params[slot.param].shape)
        if slot.rows is not None:
            shape[0] = slot.rows
        shapes[name] = shape
    # shards of at most --shard-gb, planned from the shapes, then drawn and written one at a time
    limit = int(args.shard_gb * 2**30)
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if size and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"  # 7B normal draws are slow on a CPU
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(plan):
        shard = {}
        for name in names:
            tensor = torch.empty(shapes[name], dtype=torch.bfloat16, device=draw_on)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, DUMMY_STD)
            shard[name] = tensor.cpu()
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(2 * math.prod(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    print(json.dumps({"out": str(out), "shards": len(plan), "gib": round(total / 2**30, 2)}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="load once; print seconds and peak RSS as one JSON line")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--dtype", default="float32")
    m.add_argument("--device", default="cpu")
    m.add_argument("--load-format", default="auto")
    m.set_defaults(func=measure)
    w = sub.add_parser("write-checkpoint", help="a random bf16 checkpoint of a config's shape")
    w.add_argument("--config", required=True, help="directory with config.json (and tokenizer files)")
    w.add_argument("--out", required=True)
    w.add_argument("--shard-gb", type=float, default=4.0)
    w.set_defaults(func=write_checkpoint)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
