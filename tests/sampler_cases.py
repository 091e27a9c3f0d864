"""The sampler before batching (one row at a time, a host draw per row), kept as the oracle
the batched sampler must match token for token, and a batch that uses every knob."""

from __future__ import annotations

import torch

from headwise.engine.sampling_params import SamplingParams
from headwise.engine.sequence import Sequence


def per_row_sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[int]:
    """engine/sampler.py before batching: one row at a time, on the logits' device."""
    logits = logits.clone()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.long, device=logits.device)
            row = logits[i, ids]
            logits[i, ids] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            counts = torch.bincount(
                torch.tensor(seq.output_token_ids, device=logits.device), minlength=logits.shape[1]
            ).float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if len(seq.output_token_ids) < p.min_tokens:
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if ids:
                logits[i, ids] = float("-inf")
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        if p.min_p > 0:
            probs = row.softmax(-1)
            row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = row.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
            row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = row.softmax(-1).cpu()
        noise = torch.empty_like(probs).exponential_(generator=seq.generator)
        tokens[i] = int((probs / noise).argmax())
    return tokens


def mixed_batch(seed: int) -> list[Sequence]:
    kinds = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.2, top_k=40),
        SamplingParams(
            temperature=0.7,
            min_p=0.05,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.4,
            min_tokens=50,
            stop_token_ids=[3],
        ),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.8, min_p=0.01, logprobs=3),
    ]
    g = torch.Generator().manual_seed(seed)
    return [
        Sequence(
            f"r{i}",
            torch.randint(0, 32000, (40,), generator=g).tolist(),
            kinds[i % len(kinds)],
            plan=None,
            generator=torch.Generator().manual_seed(seed * 100 + i),
            output_token_ids=torch.randint(0, 32000, (i,), generator=g).tolist(),
        )
        for i in range(32)
    ]
