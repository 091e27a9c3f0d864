"""The evaluation harness: runs task samples for every plan through one engine, scores them.

Every (task, length) group sends all its samples for all plans through one `LLMEngine`
call, so the scheduler, paged cache and batching are the ones that serve traffic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from statistics import mean

from tqdm import tqdm

from headwise.clients.eval.score import corpus_perplexity, greedy_agreement, mean_nll, string_match_all, top1_agreement
from headwise.engine.outputs import RequestOutput
from headwise.engine.sampling_params import SamplingParams
from headwise.synthetic.tasks import Sample, build_samples


@dataclass
class Row:
    plan: str
    task: str
    length: int
    samples: int
    score: float  # mean string_match_all, or perplexity for ppl
    # mean greedy agreement with the full plan (1.0 for full itself); ppl rows: teacher-forced
    # top-1 agreement over the window, since a perplexity request generates nothing to compare
    agreement: float
    kv_bytes: float  # mean peak KV bytes per request
    kv_ratio: float  # kv_bytes / full's kv_bytes for the same task and length
    # the same once the prompt is processed (select / dynamic heads shrunk): what a request
    # holds while it decodes
    kv_bytes_decode: float = 0.0
    kv_ratio_decode: float = 0.0
    # the engine's --kv-cache-dtype: the bytes above count its element size (fp8: 1 byte)
    kv_cache_dtype: str = "auto"


def evaluate(
    engine,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    seed: int,
    fmt: str = "plain",
    keys: str = "words",
    progress: bool = True,
) -> list[Row]:
    """Rows for every (task, length, plan); the full plan first, then the others as loaded."""
    plans = ["full"] + [p for p in engine.plans if p != "full"]
    limit = getattr(engine, "max_model_len", None)
    # a ppl window is `length` tokens plus the one it must generate; other tasks fit in `length`
    longest = max(lengths) + (1 if "ppl" in tasks else 0)
    if limit is not None and longest > limit:
        raise ValueError(
            f"--lengths: {max(lengths)} does not fit the model's context of {limit} tokens"
            + (" (ppl needs length + 1)" if "ppl" in tasks else "")
        )
    groups = [(t, n) for t in tasks for n in lengths]
    config = getattr(engine, "config", None)
    kv_dtype = getattr(config, "kv_cache_dtype", "auto")
    rows: list[Row] = []
    with tqdm(total=len(groups) * samples * len(plans), unit="req", desc="eval", disable=not progress) as bar:
        for task, length in groups:
            bar.set_postfix_str(f"{task} @ {length}")
            group = build_samples(task, engine.tokenizer, length, samples, seed, fmt, keys)
            prompts = [s.prompt_ids for _ in plans for s in group]
            params = [request_params(s) for _ in plans for s in group]
            names = [p for p in plans for _ in group]
            outs = engine.generate(prompts, params, names)
            bar.update(len(outs))
            by_plan = {p: outs[i * len(group) : (i + 1) * len(group)] for i, p in enumerate(plans)}
            rows.extend(score_group(group, by_plan, kv_dtype))
    return rows


def request_params(sample: Sample) -> SamplingParams:
    if sample.task == "ppl":
        # top-1 alternatives give the teacher-forced agreement with full
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    return SamplingParams(max_tokens=sample.max_tokens, temperature=0.0)


def score_group(group: list[Sample], by_plan: dict[str, list[RequestOutput]], kv_dtype: str = "auto") -> list[Row]:
    """One row per plan for one (task, length); `by_plan` holds outputs in sample order and
    always has "full"."""
    task, length = group[0].task, group[0].length
    full = by_plan["full"]
    full_kv = mean(o.kv_bytes for o in full)
    full_dec = mean(o.kv_bytes_decode for o in full)
    rows = []
    for plan, outs in by_plan.items():
        if task == "ppl":
            score = corpus_perplexity(
                [mean_nll([None if lp is None else lp.logprob for lp in o.prompt_logprobs]) for o in outs]
            )
            agreement = mean(top1_agreement(_top1(o), _top1(f)) for o, f in zip(outs, full))
        else:
            score = mean(string_match_all(o.text, s.expected) for o, s in zip(outs, group))
            agreement = mean(greedy_agreement(o.token_ids, f.token_ids) for o, f in zip(outs, full))
        kv = mean(o.kv_bytes for o in outs)
        dec = mean(o.kv_bytes_decode for o in outs)
        rows.append(
            Row(
                plan,
                task,
                length,
                len(group),
                score,
                agreement,
                kv,
                kv / full_kv if full_kv else 0.0,
                dec,
                dec / full_dec if full_dec else 0.0,
                kv_dtype,
            )
        )
    return rows


def _top1(out: RequestOutput) -> list[int]:
    return [lp.top[0][0] for lp in out.prompt_logprobs[1:]]


def format_table(rows: list[Row]) -> str:
    """One block per (task, length), a line per plan; score is accuracy, or perplexity for ppl."""
    width = max([len(r.plan) for r in rows] + [4])
    header = (
        f"{'task':<16} {'length':>6}  {'plan':<{width}}  {'kv dtype':>8}  {'score':>8}  {'agree':>6}  "
        f"{'KV MiB':>8}  {'KV ratio':>8}  {'dec MiB':>8}  {'dec ratio':>9}"
    )
    lines = [header, "-" * len(header)]
    previous = None
    for r in rows:
        if previous is not None and (r.task, r.length) != previous:
            lines.append("")
        previous = (r.task, r.length)
        score = f"{r.score:8.2f}" if r.task == "ppl" else f"{r.score:8.3f}"
        lines.append(
            f"{r.task:<16} {r.length:>6}  {r.plan:<{width}}  {r.kv_cache_dtype:>8}  {score}  {r.agreement:6.3f}  "
            f"{r.kv_bytes / 2**20:8.2f}  {r.kv_ratio:8.3f}  {r.kv_bytes_decode / 2**20:8.2f}  "
            f"{r.kv_ratio_decode:9.3f}"
        )
    lines.append(
        "score: string_match_all accuracy, ppl rows: perplexity (lower is better); agree: greedy "
        "common prefix with full, ppl rows: top-1 match with full per position; KV: peak bytes per "
        "request (prefill included: the prefill peak); dec: peak once the prompt is processed (select heads "
        "shrunk); kv dtype: the pool's --kv-cache-dtype (auto: the model's dtype)"
    )
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], config: dict) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "rows": [asdict(r) for r in rows]}, f, indent=2)
        f.write("\n")


def summarize(rows: list[Row], elapsed: float) -> str:
    """One line: per plan, mean accuracy over the accuracy rows, mean agreement and KV ratio."""
    parts = []
    for plan in dict.fromkeys(r.plan for r in rows):
        mine = [r for r in rows if r.plan == plan]
        acc = [r.score for r in mine if r.task != "ppl"]
        ppl = [r.score for r in mine if r.task == "ppl"]
        figures = []
        if acc:
            figures.append(f"acc {mean(acc):.3f}")
        if ppl:
            figures.append(f"ppl {mean(ppl):.2f}")
        if plan != "full":
            # generation agreement and ppl's teacher-forced agreement are different measures
            gen = [r.agreement for r in mine if r.task != "ppl"]
            figures.append(f"agree {mean(gen or [r.agreement for r in mine]):.3f}")
        figures.append(
            f"KV {mean(r.kv_ratio for r in mine):.2f}x (decode {mean(r.kv_ratio_decode for r in mine):.2f}x)"
        )
        parts.append(f"{plan}: " + " ".join(figures))
    groups = len({(r.task, r.length) for r in rows})
    requests = sum(r.samples for r in rows)
    return f"eval: {requests} requests in {groups} task/length groups, {elapsed:.1f} s; " + "; ".join(parts)
