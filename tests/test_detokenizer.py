"""Incremental detokenization on the default model's byte-level BPE tokenizer: one decode
per token, the same text and the same per-step character counts as the two-decode scheme
it replaced, multi-byte characters split over tokens, stop strings."""

from __future__ import annotations

import pytest
import torch

from headwise.engine.detokenizer import WINDOW, Detokenizer
from headwise.engine.loader import load_tokenizer, resolve_model_dir
from headwise.engine.sampling_params import SamplingParams
from headwise.engine.sequence import Sequence

TEXTS = [
    "Café naïve — 東京タワーの夜景 🙂🎉 ok",
    "A family emoji 👩‍👩‍👧 and math ∑ ∞ ≠ ∅, then Ünïcödé ß.",
    "def f(x):\n    return x ** 2  # плюс 中文注释\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("smollm2-135m"))


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.decodes = tokenizer, 0

    def decode(self, ids, **kw):
        self.decodes += 1
        return self.tokenizer.decode(ids, **kw)


def _seq(stop: list[str] | None = None) -> Sequence:
    return Sequence("r", [1], SamplingParams(stop=stop or []), plan=None, generator=torch.Generator())


def _two_decode_update(tokenizer, state: dict, ids: list[int]) -> int:
    """The scheme this detokenizer replaced: decode the prefix window and the whole window each token."""
    prefix = tokenizer.decode(ids[state["po"] : state["ro"]], skip_special_tokens=True)
    full = tokenizer.decode(ids[state["po"] :], skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        state["text"] += full[len(prefix) :]
        state["po"], state["ro"] = state["ro"], len(ids)
        return len(full) - len(prefix)
    return 0


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_two_decode_scheme_and_the_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert split, "the text must put a multi-byte character across tokens"
    counting = CountingTokenizer(tokenizer)
    detok, seq, old = Detokenizer(counting), _seq(), {"po": 0, "ro": 0, "text": ""}
    for n, token in enumerate(ids, 1):
        seq.output_token_ids.append(token)
        added = detok.update(seq)
        assert added == _two_decode_update(tokenizer, old, ids[:n])
        assert seq.text == old["text"] and "\ufffd" not in seq.text
    assert seq.text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert counting.decodes <= len(ids) + len(ids) // WINDOW, (counting.decodes, len(ids))


def test_stop_string_split_over_tokens_is_found_and_cut(tokenizer):
    text = "The answer is 42.\n\nNext question: what?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok, seq = Detokenizer(tokenizer), _seq(stop=["\n\nNext", "zzz"])
    hit = None
    for token in ids:
        seq.output_token_ids.append(token)
        hit = detok.find_stop(seq, detok.update(seq))
        if hit is not None:
            break
    assert hit == "\n\nNext"
    assert seq.text == "The answer is 42."
