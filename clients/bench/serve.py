"""`headwise bench serve`: load a running server like vLLM's benchmark_serving does.

Prompts are token ids of exactly --input-len tokens (slices of one tokenized random-word
text), after a --shared-prefix-len prefix common to all of them (a system prompt: what the
prefix cache serves), outputs exactly --output-len tokens (ignore_eos), streamed; TTFT is
the first chunk with text, ITL the gaps between chunks. /metrics is sampled during the run
for the peak number of running requests (the concurrency the KV pool actually admitted);
usage.prompt_tokens_details.cached_tokens gives the prompt tokens served from the cache."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case "
    "point government company number group problem fact river garden music window letter paper "
    "mountain silver orange yellow quiet rapid gentle ancient modern simple narrow"
).split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serving benchmark against a running headwise (OpenAI) server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrival rate in requests/s (default inf: all at once)",
    )
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens per request (after the shared prefix)")
    p.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="tokens every prompt starts with (a common system prompt), before its own --input-len",
    )
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--kv-plan", default=None, help="kv_plan sent with every request")
    p.add_argument("--api-key", default=None, help="bearer token, if the server has --api-key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="also write the results to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shared_prefix_len < 0:
        raise ValueError(f"--shared-prefix-len must be >= 0, got {args.shared_prefix_len}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per /metrics sample otherwise
    result = asyncio.run(benchmark(args))
    print(format_report(result))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["completed"] == args.num_prompts else 1


async def benchmark(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=None, limits=limits) as client:
        model = args.model or (await _get_json(client, "GET", "/v1/models"))["data"][0]["id"]
        prompts = await make_prompts(client, model, args.num_prompts, args.input_len, args.seed, args.shared_prefix_len)
        peaks = {"num_requests_running": 0.0, "kv_cache_usage_perc": 0.0}
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_metrics(client, peaks, stop))
        gate = asyncio.Semaphore(args.concurrency or len(prompts))
        progress = tqdm(total=len(prompts), desc="bench serve", unit="req")

        async def one(prompt: list[int]) -> RequestResult:
            async with gate:
                result = await send_request(client, model, prompt, args.output_len, args.kv_plan)
            progress.update(1)
            return result

        rng = random.Random(args.seed)
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        stop.set()
        await sampler
        progress.close()
    return summarize(results, duration, peaks, vars(args) | {"model": model})


async def make_prompts(
    client: httpx.AsyncClient, model: str, count: int, length: int, seed: int, shared: int = 0
) -> list[list[int]]:
    """`count` distinct prompts of `shared` common token ids then `length` of their own, cut
    from one tokenized text (the prefix from its start, the rest from random offsets past it)."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(_WORDS) for _ in range(shared + length + 64 * count + 256))
    pool = (await _get_json(client, "POST", "/tokenize", json={"model": model, "prompt": words}))["tokens"]
    while len(pool) < shared + length + count:
        pool = pool + pool
    prefix, rest = pool[:shared], pool[shared:]
    return [
        prefix + rest[start : start + length] for start in (rng.randrange(len(rest) - length + 1) for _ in range(count))
    ]


async def send_request(
    client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int, kv_plan: str | None
) -> RequestResult:
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kv_plan:
        payload["kv_plan"] = kv_plan
    result = RequestResult(prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


def summarize(results: list[RequestResult], duration: float, peaks: dict, config: dict) -> dict:
    done = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [x for r in done for x in r.itl]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "config": {k: v for k, v in config.items() if k != "func"},
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "max_concurrency_observed": peaks["num_requests_running"],
        "peak_kv_cache_usage": peaks["kv_cache_usage_perc"],
        "total_cached_tokens": sum(r.cached_tokens for r in done),
        # requests after the first (in sending order): with a shared prefix and concurrency 1,
        # what a warm prefix cache serves
        "mean_ttft_after_first_ms": float(np.mean([r.ttft for r in done[1:]] or [0.0]) * 1000),
    }
    for name, values in (
        ("ttft", [r.ttft for r in done]),
        ("tpot", tpot),
        ("itl", itl),
        ("e2el", [r.latency for r in done]),
    ):
        ms = np.array(values or [0.0]) * 1000
        summary.update(
            {
                f"mean_{name}_ms": float(ms.mean()),
                f"median_{name}_ms": float(np.median(ms)),
                f"p99_{name}_ms": float(np.percentile(ms, 99)),
            }
        )
    return summary


def format_report(s: dict) -> str:
    """vLLM benchmark_serving's layout, plus the peaks read from /metrics."""
    rows = [
        ("=" * 12 + " Serving Benchmark Result " + "=" * 12, None),
        ("Successful requests:", s["completed"]),
        ("Failed requests:", s["failed"]),
        ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
        ("Total input tokens:", s["total_input_tokens"]),
        ("Total generated tokens:", s["total_output_tokens"]),
        ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
        ("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}"),
        ("Max concurrency observed:", f"{s['max_concurrency_observed']:.0f}"),
        ("Peak KV cache usage (%):", f"{100 * s['peak_kv_cache_usage']:.1f}"),
        ("Prompt tokens from cache:", s["total_cached_tokens"]),
        ("Mean TTFT after the 1st (ms):", f"{s['mean_ttft_after_first_ms']:.2f}"),
    ]
    titles = {
        "ttft": ("Time to First Token", "TTFT"),
        "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
        "itl": ("Inter-token Latency", "ITL"),
        "e2el": ("End-to-end Latency", "E2EL"),
    }
    for key, (title, short) in titles.items():
        rows.append((f"{title:-^50}", None))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            rows.append((f"{label} {short} (ms):", f"{s[f'{stat}_{key}_ms']:.2f}"))
    rows.append(("=" * 50, None))
    lines = [label if value is None else f"{label:<40} {value:<10}" for label, value in rows]
    for error in s["errors"]:
        lines.append(f"error: {error}")
    lines.append(
        f"bench serve: {s['completed']} requests, {s['output_throughput']:.1f} output tok/s, "
        f"mean TTFT {s['mean_ttft_ms']:.0f} ms, max concurrency {s['max_concurrency_observed']:.0f}"
    )
    return "\n".join(lines)


async def _get_json(client: httpx.AsyncClient, method: str, path: str, **kwargs) -> dict:
    response = await client.request(method, path, **kwargs)
    if response.status_code != 200:
        raise ValueError(f"{method} {path} returned HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


_GAUGE = re.compile(r"^headwise:(num_requests_running|kv_cache_usage_perc)\{[^}]*\} ([0-9.eE+-]+)$", re.M)


async def _sample_metrics(client: httpx.AsyncClient, peaks: dict, stop: asyncio.Event) -> None:
    """Keep the peak of each gauge, sampled every 0.2 s until `stop`."""
    while not stop.is_set():
        try:
            text = (await client.get("/metrics")).text
        except httpx.HTTPError:
            text = ""
        for name, value in _GAUGE.findall(text):
            peaks[name] = max(peaks[name], float(value))
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.2)
        except TimeoutError:
            pass
