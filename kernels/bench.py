"""`headwise bench kernels` (or `python -m headwise.kernels.bench`): paged decode on a GPU.

Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, bf16), one layer, batch x
context x plan, where a plan turns 0%, 50% or 75% of the KV heads into sink 64 + window
256 heads. For each cell: paged_decode time, achieved bandwidth (K/V and q bytes read /
time) in GB/s and as a fraction of the card's peak HBM bandwidth, the time of a dense
baseline on an unpaged full cache in the same run (torch SDPA, flash-attn when
installed), the speedup over it, and the error against the torch reference on the first
sequences. `--cpu-smoke` runs tiny shapes under the Triton interpreter, only to show the
script works.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (substring of torch.cuda.get_device_name(), peak HBM GB/s); first match wins, so the
# more specific names come first ("GH200" before "H200", "A100" before "A10", "L40" before "L4")
PEAK_GBPS = [
    ("GH200", 4000),
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),
    ("H800", 3350),
    ("B200", 8000),
    ("A100 80GB PCIe", 1935),
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB", 2039),
    ("A100", 1555),
    ("A800", 2039),
    ("L40S", 864),
    ("L40", 864),
    ("L4", 300),
    ("A10G", 600),
    ("A10", 600),
    ("RTX 4090", 1008),
    ("RTX 3090", 936),
    ("V100", 900),
]


@dataclass
class Shape:
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    sink: int
    window: int
    dtype: torch.dtype


LLAMA3_8B = Shape(32, 8, 128, 16, 64, 256, torch.bfloat16)
SMOKE = Shape(8, 2, 64, 16, 4, 16, torch.bfloat16)


@dataclass
class Row:
    context: int
    batch: int
    window_pct: int
    paged_ms: float = math.nan
    gbps: float = math.nan
    dense_ms: float = math.nan
    flash_ms: float = math.nan
    max_err: float = math.nan
    note: str = ""


def peak_gbps(device_name: str) -> float | None:
    for key, value in PEAK_GBPS:
        if key.lower() in device_name.lower():
            return float(value)
    return None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated fractions") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: fractions must lie in [0, 1]")
    return values


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=_ints, default=[1, 4, 16, 64], help="batch sizes (default 1,4,16,64)")
    parser.add_argument(
        "--context",
        type=_ints,
        default=[4096, 16384, 32768, 131072],
        help="context lengths (default 4096,16384,32768,131072)",
    )
    parser.add_argument(
        "--window-fraction",
        type=_fractions,
        default=[0.0, 0.5, 0.75],
        help="fractions of KV heads that are sink 64 + window 256 heads (default 0,0.5,0.75)",
    )
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak HBM GB/s (default: table by device name)")
    parser.add_argument("--check-seqs", type=int, default=2, help="sequences checked against the reference per cell")
    parser.add_argument("--rep-ms", type=int, default=100, help="timed repetition window per measurement")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("kernels", help="paged decode bandwidth vs a dense baseline (GPU)")
    _add_arguments(parser)
    parser.set_defaults(func=run)


def _time_cuda(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms))


def _time_cpu(fn: Callable[[], object], rep_ms: int) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _plan_lengths(shape: Shape, batch: int, context: int, window_frac: float, device) -> torch.Tensor:
    """Per-(sequence, KV head) lengths: the first round(frac x heads) heads are window heads."""
    windows = round(window_frac * shape.kv_heads)
    lengths = torch.full((batch, shape.kv_heads), context, dtype=torch.int32)
    lengths[:, :windows] = min(context, shape.sink + shape.window)
    return lengths.to(device)


def _window_mask(cache, shape: Shape, context: int, windows: int):
    """(keep, recent, q_pos) of the engine's decode: window heads keep their sinks and the
    last `window` positions (their slots get those positions, so the position mask runs and
    passes), full heads see everything."""
    from headwise.kernels.layout import UNBOUNDED

    batch = cache.lengths.shape[0]
    keep = torch.zeros_like(cache.lengths)
    recent = torch.full_like(cache.lengths, UNBOUNDED)
    if windows:
        n = int(cache.lengths[0, 0])
        keep[:, :windows] = shape.sink
        recent[:, :windows] = shape.window
        slot = torch.arange(n, device=cache.pos_cache.device)
        pos = torch.where(slot < shape.sink, slot, context - n + slot).int()
        bs = cache.block_size
        tables = cache.block_tables[:, :windows, : -(-n // bs)].long()  # [B, windows, nb]
        flat = (tables[..., slot // bs] * bs + slot % bs).reshape(-1)
        cache.pos_cache.view(-1)[flat] = pos.repeat(batch * windows)
    q_pos = torch.full((batch,), context - 1, dtype=torch.int32, device=cache.lengths.device)
    return keep, recent, q_pos


def _dense_cell(shape: Shape, batch: int, context: int, q: torch.Tensor, timer, rep_ms: int) -> tuple[float, float]:
    """Time SDPA (and flash-attn if installed) on one unpaged [B, ctx, Hkv, D] cache."""
    g = shape.q_heads // shape.kv_heads
    k = torch.randn(batch, context, shape.kv_heads, shape.head_dim, device=q.device, dtype=shape.dtype)
    v = torch.randn_like(k)
    # the G query heads of a KV head become G query rows: no K/V repeat, one read per KV head
    qg = q.view(batch, shape.kv_heads, g, shape.head_dim)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    dense_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kt, vt), rep_ms)
    flash_ms = math.nan
    fa = _flash_attn() if q.is_cuda else None
    if fa is not None:
        seqlens = torch.full((batch,), context, dtype=torch.int32, device=q.device)
        flash_ms = timer(lambda: fa(q.unsqueeze(1), k, v, cache_seqlens=seqlens), rep_ms)
    return dense_ms, flash_ms


def _baseline_ms(row: Row) -> float:
    """The faster dense baseline: flash-attn when it ran, else SDPA."""
    return row.dense_ms if math.isnan(row.flash_ms) else min(row.dense_ms, row.flash_ms)


def _paged_cell(
    shape: Shape, row: Row, q: torch.Tensor, window_frac: float, check_seqs: int, timer, rep_ms: int
) -> None:
    from headwise.kernels import reference, triton_ops
    from headwise.kernels.triton_cases import allocate, rows_of

    lengths = _plan_lengths(shape, row.batch, row.context, window_frac, q.device)
    cache = allocate(
        lengths.cpu(),
        shape.block_size,
        shape.head_dim,
        shape.dtype,
        q.device,
        torch.Generator().manual_seed(0),
        fill="empty",
    )
    cache.k_cache.normal_()
    cache.v_cache.normal_()
    cache.lengths.copy_(lengths)
    windows = round(window_frac * shape.kv_heads)
    keep, recent, q_pos = _window_mask(cache, shape, row.context, windows)
    scale = shape.head_dim**-0.5
    args = (
        q,
        cache.k_cache,
        cache.v_cache,
        cache.pos_cache,
        cache.block_tables,
        rows_of(cache),
        cache.lengths,
        keep,
        recent,
        q_pos,
        scale,
    )
    row.paged_ms = timer(lambda: triton_ops.paged_decode(*args), rep_ms)
    elt = cache.k_cache.element_size()
    read = int(lengths.sum()) * shape.head_dim * 2 * elt + q.numel() * q.element_size()
    row.gbps = read / (row.paged_ms * 1e-3) / 1e9
    n = min(check_seqs, row.batch)
    out, lse = triton_ops.paged_decode(*args)
    lengths_n, keep_n, recent_n, q_pos_n = (a[:n] for a in args[6:10])
    ref_out, ref_lse = reference.paged_decode(
        q[:n], *args[1:5], args[5][:n], lengths_n, keep_n, recent_n, q_pos_n, scale
    )
    row.max_err = float((out[:n].float() - ref_out.float()).abs().max())
    if row.max_err > 2e-2 or float((lse[:n] - ref_lse).abs().max()) > 1e-3:
        row.note = "MISMATCH"


def _bytes_needed(shape: Shape, batch: int, context: int) -> int:
    """Dense K/V or the 0% plan's pool (the larger of what is alive at once), plus the reference check."""
    kv = batch * shape.kv_heads * (context + shape.block_size) * shape.head_dim * 2 * 2
    check = 2 * shape.kv_heads * context * shape.head_dim * 4 * 3
    return int(kv * 1.05) + check


def _print_table(rows: list[Row], peak: float | None, device: str) -> None:
    print(
        f"\npaged_decode on {device}; peak {peak or 'unknown'} GB/s; "
        f"dense = SDPA on an unpaged cache (fa = flash-attn, '-' if not installed)"
    )
    head = (
        f"{'context':>8} {'batch':>5} {'window%':>7} {'paged ms':>9} {'GB/s':>7} {'%peak':>6} "
        f"{'dense ms':>9} {'fa ms':>8} {'speedup':>7} {'max err':>8}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        frac = f"{100 * r.gbps / peak:5.1f}%" if peak and not math.isnan(r.gbps) else "   n/a"
        fa = "-" if math.isnan(r.flash_ms) else f"{r.flash_ms:8.3f}"
        speedup = _baseline_ms(r) / r.paged_ms if r.paged_ms > 0 else math.nan
        print(
            f"{r.context:>8} {r.batch:>5} {r.window_pct:>6}% {r.paged_ms:9.3f} {r.gbps:7.0f} {frac:>6} "
            f"{r.dense_ms:9.3f} {fa:>8} {speedup:6.2f}x {r.max_err:8.1e}  {r.note}".rstrip()
        )


def _summary(rows: list[Row], peak: float | None) -> str:
    measured = [r for r in rows if not math.isnan(r.paged_ms)]
    if not measured:
        return "paged_decode: nothing measured"
    best = max(measured, key=lambda r: r.gbps)
    frac = f" ({100 * best.gbps / peak:.0f}% of {peak:.0f})" if peak else ""
    bad = sum(r.note == "MISMATCH" for r in measured)
    half = [r for r in measured if r.window_pct == 50]
    speed = ""
    if half:
        top = max(half, key=lambda r: (r.context, r.batch))
        gain = _baseline_ms(top) / top.paged_ms
        speed = f"; 50%-window plan at ctx {top.context} B {top.batch}: {gain:.2f}x vs dense"
    return (
        f"paged_decode: best {best.gbps:.0f} GB/s{frac} at ctx {best.context} B {best.batch} "
        f"{best.window_pct}% window{speed}; {len(measured) - bad}/{len(measured)} cells match the reference"
    )


def run(args: argparse.Namespace) -> int:
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        from headwise.kernels import triton_common

        if not triton_common.INTERPRET:
            print("headwise bench kernels: triton_ops was imported before TRITON_INTERPRET=1 was set", file=sys.stderr)
            return 2
        shape, device, timer = SMOKE, torch.device("cpu"), _time_cpu
        batches, contexts, peak, name = [2], [64], args.peak_gbps, "cpu (Triton interpreter)"
    else:
        if not torch.cuda.is_available():
            print("headwise bench kernels: no CUDA device (pass --cpu-smoke for an interpreter run)", file=sys.stderr)
            return 2
        shape, device, timer = LLAMA3_8B, torch.device("cuda"), _time_cuda
        batches, contexts = args.batch, args.context
        name = torch.cuda.get_device_name(device)
        peak = args.peak_gbps or peak_gbps(name)
    from tqdm import tqdm

    rows: list[Row] = []
    cells = [(c, b) for c in contexts for b in batches]
    for context, batch in tqdm(cells, desc="bench kernels", file=sys.stderr):
        plan_rows = [Row(context, batch, round(100 * f)) for f in args.window_fraction]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            need, free = _bytes_needed(shape, batch, context), torch.cuda.mem_get_info(device)[0]
            if need > free:
                for r in plan_rows:
                    r.note = f"skipped: needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} free"
                rows += plan_rows
                continue
        gen = torch.Generator(device=device).manual_seed(batch * 7 + context)
        q = torch.randn(batch, shape.q_heads, shape.head_dim, device=device, dtype=shape.dtype, generator=gen)
        dense_ms, flash_ms = _dense_cell(shape, batch, context, q, timer, args.rep_ms)
        for frac, r in zip(args.window_fraction, plan_rows):
            r.dense_ms, r.flash_ms = dense_ms, flash_ms
            _paged_cell(shape, r, q, frac, args.check_seqs, timer, args.rep_ms)
        rows += plan_rows
    _print_table(rows, peak, name)
    print(_summary(rows, peak))
    return 1 if any(r.note == "MISMATCH" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headwise.kernels.bench", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
