"""Retrieval Head (Wu et al. 2024): copy-paste scores from greedy needle-in-a-haystack runs.

While the model greedily answers a needle question, a head copy-pastes at a step when its
top-1 attended position lies inside the needle and the token there is the token being
generated. A test's score per head is copied tokens / answer tokens; a head's score is the
mean over the tests the model answered correctly (all tests if it answered none).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from headwise.profilers.dense_forward import greedy

DEFAULT_LENGTHS = (1024, 2048)
DEFAULT_SAMPLES = 8  # per length; depths spread evenly over 0-100%
ANSWER_SLACK = 4  # tokens generated beyond the answer (": " and the like come first)


@dataclass
class NeedleTest:
    prompt_ids: list[int]
    needle: tuple[int, int]  # [start, end) of the needle sentence in prompt_ids
    answer: str  # the planted value the model must reproduce
    answer_tokens: int  # its token count: the copy-paste score's denominator


def build_tests(tokenizer, lengths: list[int], samples: int, seed: int) -> list[NeedleTest]:
    """Needle sentences with random values at evenly spread depths in real prose (the pydoc
    topics, as `headwise eval` uses). The seed namespace differs from eval's, so profiling
    never sees an evaluation prompt. Even samples hide a magic number, odd ones a pass key."""
    from headwise.synthetic.prompts import Needle, build_prompt
    from headwise.synthetic.tasks import NIAH_INSTRUCTION, PASSKEY_INSTRUCTION, sample_depth
    from headwise.synthetic.text import distinct_numbers, encode, word_keys

    tests = []
    for length in lengths:
        for i in range(samples):
            rng = random.Random(f"headwise-profile-retrieval:{seed}:{length}:{i}")
            depth = sample_depth(i, samples)
            if i % 2 == 0:
                key, value = word_keys(rng, 1)[0], str(distinct_numbers(rng, 7, 1)[0])
                needle = Needle(f"One of the special magic numbers for {key} is: {value}.", depth)
                parts = (
                    NIAH_INSTRUCTION,
                    f"What is the special magic number for {key} mentioned in the provided text?",
                    f"The special magic number for {key} mentioned in the provided text is",
                )
            else:
                value = str(distinct_numbers(rng, 5, 1)[0])
                needle = Needle(f"The pass key is {value}. Remember it. {value} is the pass key.", depth)
                parts = (PASSKEY_INSTRUCTION, "What is the pass key?", "The pass key is")
            answer_tokens = len(encode(tokenizer, " " + value))
            prompt = build_prompt(
                tokenizer, length - answer_tokens - ANSWER_SLACK, parts[0], [needle], parts[1], parts[2], "natural", rng
            )
            tests.append(NeedleTest(prompt.ids, prompt.needle_spans[0], value, answer_tokens))
    return tests


def copy_paste(model, test: NeedleTest, stop: set[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy answer to one test and each query head's copy-paste score `[L, Hq]`."""
    cfg = model.cfg
    copies = torch.zeros(cfg.num_layers, cfg.num_heads)
    start, end = test.needle
    prompt = torch.tensor(test.prompt_ids)

    def record(token: int, layer: int, probs: torch.Tensor) -> None:
        top = probs.argmax(-1).clamp(max=len(prompt) - 1)  # [Hq]; a generated position is never inside
        copies[layer] += ((top >= start) & (top < end) & (prompt[top] == token)).float()

    generated = greedy(model, test.prompt_ids, test.answer_tokens + ANSWER_SLACK, stop, record)
    return generated, copies / max(1, test.answer_tokens)


def retrieval_scores(
    model,
    tests: list[NeedleTest],
    correct: Callable[[NeedleTest, list[int]], bool],
    stop: set[int] | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """Query-head scores `[L, Hq]` averaged over the correctly answered tests, and how many
    tests were answered correctly."""
    cfg = model.cfg
    total = torch.zeros(cfg.num_layers, cfg.num_heads)
    fallback = torch.zeros_like(total)
    n_correct = 0
    with tqdm(tests, desc="retrieval", unit="test", disable=not progress) as bar:
        for test in bar:
            generated, scores = copy_paste(model, test, stop)
            fallback += scores
            if correct(test, generated):
                total += scores
                n_correct += 1
            bar.set_postfix_str(f"correct {n_correct}")
    if n_correct == 0:
        return fallback / max(1, len(tests)), 0
    return total / n_correct, n_correct
