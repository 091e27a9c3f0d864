"""`headwise bench offline`: output tokens/s of the engine, optionally next to
transformers `generate` on the same prompts, model, dtype and device, in the same run
(with `--load-format dummy`, both sides draw random weights from config.json alone)."""

from __future__ import annotations

import argparse
import json
import random
import time

from headwise.clients.cli import CliError
from headwise.clients.engine_args import add_engine_args, engine_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("offline", help="offline throughput (optionally vs transformers)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", default="128-1024", help="tokens per prompt: N or a range LO-HI")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--baseline", choices=["hf"], default=None, help="also time transformers generate")
    p.add_argument(
        "--hf-batch-size", type=int, default=None, help="static batch size of the baseline (default: --max-num-seqs)"
    )
    p.add_argument("--kv-plan", default=None, help="plan for every request (default: the default plan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_engine_args(p)
    p.set_defaults(func=run)


def parse_range(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise CliError(f"--input-len {value!r}: expected N or LO-HI") from None
    if a < 1 or b < a:
        raise CliError(f"--input-len {value!r}: expected 1 <= LO <= HI")
    return a, b


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids (as vLLM's benchmark does), lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_engine(engine, prompts, output_len: int, plan: str | None) -> tuple[float, int]:
    """Seconds to finish every prompt, and the most requests that ran at once (max over steps
    of `engine.stats().num_running`: what the KV pool admitted)."""
    from tqdm import tqdm

    from headwise.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    peak = 0
    t = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"offline-{i}", prompt, params, plan)
    with tqdm(total=len(prompts), desc="headwise", unit="req") as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert len(out.token_ids) == output_len, out.finish_reason
                    bar.update(1)
            peak = max(peak, engine.stats().num_running)
    return time.perf_counter() - t, peak


def load_hf(model_dir: str, dtype: str, device: str, load_format: str, seed: int):
    """transformers' model of `model_dir` on `device` in `dtype`: the checkpoint (`auto`) or,
    for `dummy`, Hugging Face's own random init from config.json alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dt = getattr(torch, dtype)
    if load_format == "dummy":
        torch.manual_seed(seed)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dt)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, device_map=device)
    return hf.eval()


def run_hf(hf, prompts, output_len: int, batch: int, pad_id: int) -> float:
    import torch
    from tqdm import tqdm

    device = next(hf.parameters()).device
    t = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch), desc="transformers", unit="batch"):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=pad_id,
            )
        assert out.shape[1] == width + output_len
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> int:
    import gc

    import torch

    from headwise.engine.llm_engine import LLMEngine
    from headwise.engine.loader import resolve_model_dir

    lo, hi = parse_range(args.input_len)
    engine = LLMEngine(engine_config_from_args(args))
    prompts = make_prompts(args.num_prompts, lo, hi, engine.model_config.vocab_size, args.seed)
    total_out = args.num_prompts * args.output_len
    t_engine, peak = run_engine(engine, prompts, args.output_len, args.kv_plan)
    result = {
        "model": engine.model_id,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "prompt_tokens": sum(map(len, prompts)),
        "max_num_seqs": args.max_num_seqs,
        "engine_s": round(t_engine, 2),
        "engine_tok_s": round(total_out / t_engine, 2),
        "device": args.device,
        "load_format": args.load_format,
        "peak_num_running": peak,
    }
    if args.baseline == "hf":
        batch = args.hf_batch_size or args.max_num_seqs
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        del engine  # its KV pool; the baseline needs the device memory
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        hf = load_hf(str(resolve_model_dir(args.model)), args.dtype, args.device, args.load_format, args.seed)
        t_hf = run_hf(hf, prompts, args.output_len, batch, pad)
        param = next(hf.parameters())
        result.update(
            hf_batch_size=batch,
            hf_s=round(t_hf, 2),
            hf_tok_s=round(total_out / t_hf, 2),
            speedup=round(t_hf / t_engine, 2),
            hf_device=str(param.device),
            hf_dtype=str(param.dtype).removeprefix("torch."),
        )
    if args.json:
        print(json.dumps(result))
    else:
        line = (
            f"headwise: {result['engine_tok_s']} output tok/s ({total_out} tokens in {result['engine_s']} s, "
            f"{result['prompt_tokens']} prompt tokens, at most {peak} requests running)"
        )
        if "hf_tok_s" in result:
            line += (
                f"; transformers generate (batch {result['hf_batch_size']}, {result['hf_device']}): "
                f"{result['hf_tok_s']} tok/s; speed-up {result['speedup']}x"
            )
        print(line)
    return 0
