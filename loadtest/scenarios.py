"""Load shapes for the locust users: prompt length, output length, streaming. (To run only
one endpoint, name its user class on the locust command line: `ChatUser` or `CompletionUser`.)"""

from __future__ import annotations

import random
from dataclasses import dataclass

_WORDS = (
    "the quick brown fox jumps over a lazy dog while river mountain garden window letter paper "
    "music silver orange quiet rapid gentle ancient modern simple narrow city ocean forest"
).split()


@dataclass(frozen=True)
class Scenario:
    prompt_words: int  # about one token per word for the default tokenizer
    max_tokens: int
    stream: bool = True


SCENARIOS = {
    "short": Scenario(prompt_words=32, max_tokens=16),
    "long": Scenario(prompt_words=1500, max_tokens=32),
    "blocking": Scenario(prompt_words=32, max_tokens=16, stream=False),
}


def scenario(
    name: str, prompt_words: int | None = None, max_tokens: int | None = None, stream: bool | None = None
) -> Scenario:
    """A preset by name, with any of its fields overridden."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    base = SCENARIOS[name]
    return Scenario(
        prompt_words if prompt_words is not None else base.prompt_words,
        max_tokens if max_tokens is not None else base.max_tokens,
        base.stream if stream is None else stream,
    )


def make_prompt(rng: random.Random, words: int) -> str:
    """Random words, so no two users send the same prompt."""
    return " ".join(rng.choice(_WORDS) for _ in range(words))
