"""Offline text for the evaluation tasks: haystack filler, key words, the perplexity corpus.

Everything comes from constants here or from text that ships with Python
(`pydoc_data.topics`), so a run never downloads anything and a seed fixes every prompt.
"""

from __future__ import annotations

import functools
import random
import re
import uuid
from dataclasses import dataclass
from pydoc_data import topics

# the classic passkey / RULER noise, one unit per sentence so a needle lands between sentences
REPEATED_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
HAYSTACKS = ("repeated", "natural")

# RULER-style keys "adjective-noun": 32 x 32 distinct pairs, each word a plain English token
ADJECTIVES = (
    "brave",
    "calm",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "jolly",
    "kind",
    "lively",
    "merry",
    "nice",
    "proud",
    "silly",
    "witty",
    "zealous",
    "bright",
    "quiet",
    "swift",
    "bold",
    "clever",
    "fierce",
    "grand",
    "humble",
    "loyal",
    "noble",
    "polite",
    "rapid",
    "sharp",
    "tidy",
    "vivid",
    "wise",
    "young",
)
NOUNS = (
    "tiger",
    "apple",
    "river",
    "castle",
    "falcon",
    "garden",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "mountain",
    "needle",
    "orange",
    "pencil",
    "quartz",
    "rabbit",
    "saddle",
    "tunnel",
    "violin",
    "wagon",
    "yacht",
    "zebra",
    "anchor",
    "basket",
    "candle",
    "dragon",
    "engine",
    "forest",
    "guitar",
    "hammer",
    "lantern",
)


@dataclass
class Filler:
    """Haystack tokens cut at sentence ends; `boundaries` are the offsets where a needle may go."""

    ids: list[int]
    boundaries: list[int]  # ascending, always holds 0 and len(ids)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt piece without special tokens, so pieces concatenate cleanly."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def pydoc_text() -> str:
    """All pydoc topics in sorted key order: ~465k characters of real English + code."""
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@functools.cache
def prose_sentences() -> tuple[str, ...]:
    """Prose sentences of the pydoc topics: code blocks, grammar rules and headings dropped."""
    out: list[str] = []
    for key in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[key]):
            lines = para.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue  # indented: code, grammar or a table
            if any(re.fullmatch(r"[*=\-]+", line.strip()) for line in lines):
                continue  # a heading underline
            text = " ".join(line.strip() for line in lines)
            if len(text) < 120 or "::=" in text or ">>>" in text:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text):
                # long digit runs would look like a planted value to the model and the scorer
                if sentence.endswith((".", "!", "?")) and not re.search(r"\d{4,}", sentence):
                    out.append(sentence)
    return tuple(out)


def filler(tokenizer, kind: str, n_tokens: int, rng: random.Random) -> Filler:
    """Exactly `n_tokens` of haystack: `repeated` noise, or `natural` prose from a seeded start."""
    if kind == "repeated":
        units = _repeated_unit_ids(tokenizer)
        start = 0
    elif kind == "natural":
        sentences = prose_sentences()
        units = None
        start = rng.randrange(len(sentences))
    else:
        raise ValueError(f"haystack {kind!r} is unknown; choose one of {', '.join(HAYSTACKS)}")
    ids: list[int] = []
    boundaries = [0]
    i = start
    while len(ids) < n_tokens:
        if units is not None:
            piece = units[i % len(units)]
        else:
            piece = encode(tokenizer, " " + sentences[i % len(sentences)])
        ids.extend(piece)
        boundaries.append(len(ids))
        i += 1
    # the last sentence may be cut mid-way; the boundary list ends at the exact length
    ids = ids[:n_tokens]
    boundaries = [b for b in boundaries if b < n_tokens] + [n_tokens]
    return Filler(ids, boundaries)


@functools.lru_cache(maxsize=4)
def _repeated_unit_ids(tokenizer) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(encode(tokenizer, " " + s)) for s in REPEATED_SENTENCES)


def word_keys(rng: random.Random, n: int) -> list[str]:
    """`n` distinct "adjective-noun" keys."""
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def uuid_keys(rng: random.Random, n: int) -> list[str]:
    """`n` distinct version-4 style uuids drawn from `rng` (not from the OS)."""
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def distinct_numbers(rng: random.Random, digits: int, n: int) -> list[int]:
    """`n` distinct numbers of exactly `digits` digits."""
    return rng.sample(range(10 ** (digits - 1), 10**digits), n)


@functools.lru_cache(maxsize=2)
def corpus_ids(tokenizer) -> tuple[int, ...]:
    """The pydoc corpus as token ids; cached because tokenizing it takes about a second."""
    return tuple(encode(tokenizer, pydoc_text()))
