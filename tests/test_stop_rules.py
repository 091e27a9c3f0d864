"""Why a request ends after a sampled token (engine/stop_rules.py), model-free: the sequence's
text is set by hand, as the detokenizer would have extended it."""

from __future__ import annotations

import pytest
import torch

from headwise.engine.detokenizer import Detokenizer
from headwise.engine.sampling_params import SamplingParams
from headwise.engine.sequence import Sequence
from headwise.engine.stop_rules import finish_reason
from headwise.kvcache.plans import full_plan
from tests.fake_kv import SHAPE

EOS = 2
DETOK = Detokenizer(None)  # find_stop reads only the sequence's text


def after(outputs: list[int], text: str = "", prompt_len: int = 4, **params) -> Sequence:
    seq = Sequence("r", list(range(10, 10 + prompt_len)), SamplingParams(**params), full_plan(SHAPE), torch.Generator())
    seq.output_token_ids = list(outputs)
    seq.text = text
    return seq


def reason(seq: Sequence, new_chars: int = 1, max_model_len: int = 64):
    return finish_reason(seq, seq.output_token_ids[-1], new_chars, DETOK, (EOS,), max_model_len)


def test_eos_stops_unless_ignored_or_before_min_tokens():
    assert reason(after([5, EOS], max_tokens=8)) == ("stop", None)
    assert reason(after([5, EOS], max_tokens=8, ignore_eos=True)) is None
    assert reason(after([5, EOS], max_tokens=8, min_tokens=3)) is None


def test_a_stop_token_id_is_the_stop_reason():
    assert reason(after([5, 9], max_tokens=8, stop_token_ids=[9])) == ("stop", 9)


def test_a_stop_string_in_the_new_text_is_cut_and_reported():
    seq = after([5, 6], text="hello wor", max_tokens=8, stop=["o w"])
    assert reason(seq, new_chars=4) == ("stop", "o w") and seq.text == "hell"
    # only text the newest token could have completed is searched
    seq = after([5, 6], text="o w and more", max_tokens=8, stop=["o w"])
    assert reason(seq, new_chars=3) is None and seq.text == "o w and more"


@pytest.mark.parametrize(
    "outputs, max_tokens, max_model_len, expected",
    [
        ([5, 6, 7], 3, 64, ("length", None)),  # max_tokens reached
        ([5, 6], 3, 64, None),
        ([5, 6], 8, 6, ("length", None)),  # 4 prompt + 2 out = the model's context
    ],
)
def test_length_ends_at_max_tokens_or_the_context(outputs, max_tokens, max_model_len, expected):
    assert reason(after(outputs, max_tokens=max_tokens), max_model_len=max_model_len) == expected


def test_stop_wins_over_length_on_the_same_token():
    assert reason(after([5, EOS], max_tokens=2)) == ("stop", None)
