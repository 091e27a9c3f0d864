"""The evaluation tasks: passkey, RULER-style needles, variable tracking, perplexity.

Every sample is a pure function of (task, length, index, seed, tokenizer, format): it
draws from its own `random.Random`, so adding samples never changes the earlier ones.
Generation tasks build prompts of `length - max_tokens` tokens, so prompt plus answer fit
in `length` (RULER's convention); a perplexity window is `length` tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from headwise.synthetic.prompts import Needle, build_prompt
from headwise.synthetic.text import corpus_ids, distinct_numbers, uuid_keys, word_keys

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "ppl")
KEY_KINDS = ("words", "uuids")

# answer token budgets: the answer plus a little slack (digits are one token each in SmolLM2)
MAX_TOKENS = {"passkey": 10, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "vt": 32, "ppl": 1}

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards."
)
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
NEEDLES_PER_SAMPLE = 4  # multikey: 1 queried + 3 distractor keys; multivalue: values per key
VT_HOPS = 4


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt_ids: list[int]
    expected: list[str]  # string_match_all targets; empty for ppl
    max_tokens: int
    depth: float | None = None  # where the (queried / first) needle sits in the context
    haystack: str | None = None
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in prompt_ids
    context: tuple[int, int] | None = None  # [start, end) of the haystack in prompt_ids


def build_samples(
    task: str, tokenizer, length: int, n: int, seed: int, fmt: str = "plain", keys: str = "words"
) -> list[Sample]:
    """`n` samples of `task` at `length` tokens; depths spread evenly over 0-100%."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; choose from {', '.join(TASKS)}")
    if keys not in KEY_KINDS:
        raise ValueError(f"needle keys {keys!r} are unknown; choose one of {', '.join(KEY_KINDS)}")
    if n < 1:
        raise ValueError(f"samples must be >= 1, got {n}")
    return [_build_one(task, tokenizer, length, i, n, seed, fmt, keys) for i in range(n)]


def sample_depth(index: int, n: int) -> float:
    return index / (n - 1) if n > 1 else 0.5


def sample_haystack(task: str, index: int) -> str:
    """Passkey and vt use the classic noise; needle tasks alternate noise and real prose."""
    if task.startswith("niah") and index % 2 == 1:
        return "natural"
    return "repeated"


def _build_one(task: str, tokenizer, length: int, index: int, n: int, seed: int, fmt: str, keys: str) -> Sample:
    # a string seed hashes with SHA-512, stable across processes and PYTHONHASHSEED
    rng = random.Random(f"headwise-eval:{seed}:{task}:{length}:{index}")
    if task == "ppl":
        return _ppl_sample(tokenizer, length, index, rng)
    depth = sample_depth(index, n)
    haystack = sample_haystack(task, index)
    max_tokens = MAX_TOKENS[task]
    if task == "passkey":
        k = distinct_numbers(rng, 5, 1)[0]
        needles = [Needle(f"The pass key is {k}. Remember it. {k} is the pass key.", depth)]
        parts = (PASSKEY_INSTRUCTION, "What is the pass key?", "The pass key is")
        expected = [str(k)]
    elif task == "vt":
        needles, parts, expected = _vt_parts(rng)
    else:
        needles, parts, expected = _niah_parts(task, depth, rng, keys)
    instruction, question, answer_prefix = parts
    prompt = build_prompt(
        tokenizer, length - max_tokens, instruction, needles, question, answer_prefix, haystack, rng, fmt
    )
    return Sample(
        task,
        length,
        index,
        prompt.ids,
        expected,
        max_tokens,
        None if task == "vt" else depth,
        haystack,
        prompt.needle_spans,
        prompt.context,
    )


def _niah_parts(
    task: str, depth: float, rng: random.Random, keys: str
) -> tuple[list[Needle], tuple[str, str, str], list[str]]:
    count = 1 if task == "niah_single" else NEEDLES_PER_SAMPLE
    values = [str(v) for v in distinct_numbers(rng, 7, count)]
    n_keys = NEEDLES_PER_SAMPLE if task == "niah_multikey" else 1
    key_list = word_keys(rng, n_keys) if keys == "words" else uuid_keys(rng, n_keys)
    if task == "niah_multivalue":
        pairs = [(key_list[0], v) for v in values]
    else:
        pairs = list(zip(key_list, values))
    # the first needle is the queried one and sits at the sample's depth; the rest anywhere
    depths = [depth] + [rng.random() for _ in pairs[1:]]
    needles = [Needle(f"One of the special magic numbers for {k} is: {v}.", d) for (k, v), d in zip(pairs, depths)]
    key = key_list[0]
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    answer_prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    expected = values if task == "niah_multivalue" else [values[0]]
    return needles, (NIAH_INSTRUCTION, question, answer_prefix), expected


def _vt_parts(rng: random.Random) -> tuple[list[Needle], tuple[str, str, str], list[str]]:
    value = str(distinct_numbers(rng, 5, 1)[0])
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names and name != "VAR":
            names.append(name)
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    # sorted depths keep the chain in reading order
    depths = sorted(rng.random() for _ in statements)
    needles = [Needle(s, d) for s, d in zip(statements, depths)]
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:"
    )
    return needles, (VT_INSTRUCTION, question, answer_prefix), names


def _ppl_sample(tokenizer, length: int, index: int, rng: random.Random) -> Sample:
    ids = corpus_ids(tokenizer)
    if length < 2 or length > len(ids):
        raise ValueError(f"ppl length must be in [2, {len(ids)}] tokens, got {length}")
    start = rng.randrange(len(ids) - length + 1)
    return Sample("ppl", length, index, list(ids[start : start + length]), [], MAX_TOKENS["ppl"])
