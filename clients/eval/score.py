"""Scores for `headwise eval`: RULER's string_match_all, perplexity, agreement with full."""

from __future__ import annotations

import math
from collections.abc import Sequence


def string_match_all(output: str, expected: Sequence[str]) -> float:
    """Fraction of `expected` strings found in `output`, case-insensitive (RULER)."""
    if not expected:
        raise ValueError("string_match_all needs at least one expected string")
    text = output.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def mean_nll(prompt_logprobs: Sequence[float | None]) -> float:
    """Mean negative log-probability of every token after the first (which has no context)."""
    scored = [lp for lp in prompt_logprobs[1:] if lp is not None]
    if len(scored) != len(prompt_logprobs) - 1 or not scored:
        raise ValueError(
            f"need a logprob for every token after the first; got {len(scored)} of {len(prompt_logprobs) - 1}"
        )
    return -sum(scored) / len(scored)


def perplexity(prompt_logprobs: Sequence[float | None]) -> float:
    """exp of the mean negative log-probability over the tokens after the first."""
    return math.exp(mean_nll(prompt_logprobs))


def corpus_perplexity(nlls: Sequence[float]) -> float:
    """Perplexity over several equal-length windows: exp of their mean NLL (the geometric
    mean of the window perplexities), so one bad window cannot dominate the figure."""
    if not nlls:
        raise ValueError("corpus_perplexity needs at least one window")
    return math.exp(sum(nlls) / len(nlls))


def greedy_agreement(tokens: Sequence[int], full_tokens: Sequence[int]) -> float:
    """Length of the common prefix of `tokens` and the full cache's `full_tokens`, over the
    length of `full_tokens`: 1.0 when the plan reproduces the full output exactly."""
    if not full_tokens:
        return 1.0 if not tokens else 0.0
    common = 0
    for a, b in zip(tokens, full_tokens):
        if a != b:
            break
        common += 1
    return common / len(full_tokens)


def top1_agreement(top1: Sequence[int], full_top1: Sequence[int]) -> float:
    """Teacher-forced agreement, for perplexity windows where nothing is generated: the
    fraction of positions where the plan's most likely next token is the full cache's."""
    if len(top1) != len(full_top1) or not full_top1:
        raise ValueError(f"top1_agreement needs two equal, non-empty lists; got {len(top1)} and {len(full_top1)}")
    return sum(a == b for a, b in zip(top1, full_top1)) / len(full_top1)
