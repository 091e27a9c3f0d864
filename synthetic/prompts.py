"""Prompt assembly to an exact token count: instruction, haystack with needles, question.

The prompt is built as token ids, piece by piece, so its length is exact rather than a
character estimate: each piece is tokenized on its own (pieces start with a space or a
newline, where a BPE tokenizer splits anyway) and the haystack is cut to the token count
that is left over.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from headwise.synthetic.text import encode, filler

FORMATS = ("plain", "chat")
_SENTINEL = "\x00HEADWISE\x00"


@dataclass
class Needle:
    text: str  # one sentence; gets a leading space, like every haystack sentence
    depth: float  # 0.0 = right after the instruction, 1.0 = right before the question


@dataclass
class Prompt:
    ids: list[int]
    needle_spans: list[tuple[int, int]]  # [start, end) in ids, in the order the needles were given
    context: tuple[int, int]  # [start, end) of haystack + needles in ids


def chat_wrap(tokenizer) -> tuple[str, str]:
    """The model's chat template around one user turn: (text before it, text after it up
    to where the assistant's reply starts)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("format 'chat' needs a tokenizer with a chat template; use --format plain")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(_SENTINEL)
    return before, after


def build_prompt(
    tokenizer,
    n_tokens: int,
    instruction: str,
    needles: list[Needle],
    question: str,
    answer_prefix: str,
    haystack: str,
    rng: random.Random,
    fmt: str = "plain",
) -> Prompt:
    """A prompt of exactly `n_tokens` ids: `instruction`, haystack with `needles` at their
    depths, `question`, then `answer_prefix` for the model to continue."""
    if fmt == "plain":
        before, after = "", " "
    elif fmt == "chat":
        before, after = chat_wrap(tokenizer)
    else:
        raise ValueError(f"format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    # BOS (or nothing) exactly as the tokenizer adds it to a whole prompt
    head = encode_specials(tokenizer) + encode(tokenizer, before + instruction)
    tail = encode(tokenizer, "\n" + question + after + answer_prefix)
    needle_ids = [encode(tokenizer, " " + n.text) for n in needles]
    n_filler = n_tokens - len(head) - len(tail) - sum(len(ids) for ids in needle_ids)
    if n_filler < 0:
        need = n_tokens - n_filler
        raise ValueError(f"length {n_tokens} is too short for this task: the prompt needs at least {need} tokens")
    hay = filler(tokenizer, haystack, n_filler, rng)
    # stable order: needles at the same boundary keep the order they were given (vt chains)
    placed = sorted(range(len(needles)), key=lambda i: (_nearest(hay.boundaries, needles[i].depth * n_filler), i))
    ids = list(head)
    spans: list[tuple[int, int] | None] = [None] * len(needles)
    cursor = 0
    for i in placed:
        pos = _nearest(hay.boundaries, needles[i].depth * n_filler)
        ids.extend(hay.ids[cursor:pos])
        cursor = pos
        spans[i] = (len(ids), len(ids) + len(needle_ids[i]))
        ids.extend(needle_ids[i])
    ids.extend(hay.ids[cursor:])
    context = (len(head), len(ids))
    ids.extend(tail)
    assert len(ids) == n_tokens, (len(ids), n_tokens)
    return Prompt(ids, [s for s in spans if s is not None], context)


def encode_specials(tokenizer) -> list[int]:
    """What the tokenizer puts around an empty text (a BOS for Llama, nothing for SmolLM2)."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def _nearest(boundaries: list[int], target: float) -> int:
    """The sentence boundary closest to `target` tokens into the haystack."""
    i = bisect.bisect_left(boundaries, target)
    if i == 0:
        return boundaries[0]
    if i == len(boundaries):
        return boundaries[-1]
    lo, hi = boundaries[i - 1], boundaries[i]
    return lo if target - lo <= hi - target else hi
