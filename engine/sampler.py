"""Logits -> next tokens: penalties, temperature, top-k / top-p / min-p, seeded draws.

Each request owns a torch.Generator, so a seeded request draws the same numbers
whatever else shares its batch and however often it is preempted.
"""

from __future__ import annotations

import torch

from headwise.engine.outputs import TokenLogprob
from headwise.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.long, device=logits.device)
            row = logits[i, ids]
            logits[i, ids] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            counts = torch.bincount(torch.tensor(seq.output_token_ids, device=logits.device),
                                    minlength=logits.shape[1]).float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def suppress_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    """Before min_tokens, EOS and stop tokens cannot be drawn."""
    for i, seq in enumerate(seqs):
        if len(seq.output_token_ids) < seq.params.min_tokens:
            ids = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else list(eos_ids))
            if ids:
                logits[i, ids] = float("-inf")


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
    """Next token per row of `logits [B, V]` and the raw log-probabilities `[B, V]`."""
    raw_logprobs = logits.log_softmax(-1)
    logits = apply_penalties(logits.clone(), seqs)
    suppress_stop_tokens(logits, seqs, eos_ids)
    tokens = logits.argmax(-1).tolist()  # greedy rows; one transfer for the batch
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        # drawn on the host with the request's own generator: the same draw on every device
        probs = row.softmax(-1).cpu()
        # exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p
        noise = torch.empty_like(probs).exponential_(generator=seq.generator)
        tokens[i] = int((probs / noise).argmax())
    return tokens, raw_logprobs


def token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """The chosen token's log-probability and the top-k alternatives of one row."""
    top: list[tuple[int, float]] = []
    if k:
        vals, ids = torch.topk(logprobs, k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)
