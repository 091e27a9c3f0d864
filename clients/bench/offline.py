"""`headwise bench offline`: output tokens/s of the engine, optionally next to
transformers `generate` on the same prompts, model and dtype, in the same run."""

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
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="static batch size of the baseline (default: --max-num-seqs)")
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


def run_engine(engine, prompts, output_len: int, plan: str | None) -> float:
    from headwise.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(prompts, params, plan, use_tqdm=True)
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == output_len for o in outs)
    return elapsed


def run_hf(model_dir: str, dtype: str, prompts, output_len: int, batch: int, pad_id: int) -> float:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    t = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch), desc="transformers", unit="batch"):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                              min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] == width + output_len
    return time.perf_counter() - t


def run(args: argparse.Namespace) -> int:
    from headwise.engine.llm_engine import LLMEngine
    from headwise.engine.loader import resolve_model_dir

    lo, hi = parse_range(args.input_len)
    engine = LLMEngine(engine_config_from_args(args))
    prompts = make_prompts(args.num_prompts, lo, hi, engine.model_config.vocab_size, args.seed)
    total_out = args.num_prompts * args.output_len
    t_engine = run_engine(engine, prompts, args.output_len, args.kv_plan)
    result = {"model": engine.model_id, "dtype": args.dtype, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len,
              "prompt_tokens": sum(map(len, prompts)), "max_num_seqs": args.max_num_seqs,
              "engine_s": round(t_engine, 2), "engine_tok_s": round(total_out / t_engine, 2)}
    if args.baseline == "hf":
        batch = args.hf_batch_size or args.max_num_seqs
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        t_hf = run_hf(str(resolve_model_dir(args.model)), args.dtype, prompts, args.output_len, batch, pad)
        result.update(hf_batch_size=batch, hf_s=round(t_hf, 2), hf_tok_s=round(total_out / t_hf, 2),
                      speedup=round(t_hf / t_engine, 2))
    if args.json:
        print(json.dumps(result))
    else:
        line = (f"headwise: {result['engine_tok_s']} output tok/s ({total_out} tokens in {result['engine_s']} s, "
                f"{result['prompt_tokens']} prompt tokens)")
        if "hf_tok_s" in result:
            line += (f"; transformers generate (batch {result['hf_batch_size']}): {result['hf_tok_s']} tok/s; "
                     f"speed-up {result['speedup']}x")
        print(line)
    return 0
