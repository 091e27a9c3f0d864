"""Data generation for `headwise eval`: deterministic, exact lengths, needles where asked."""

from __future__ import annotations

import re

import pytest

from headwise.engine.loader import load_tokenizer, resolve_model_dir
from headwise.synthetic.tasks import MAX_TOKENS, TASKS, build_samples
from headwise.synthetic.text import corpus_ids, prose_sentences

GEN_TASKS = [t for t in TASKS if t != "ppl"]


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer alone, without its weights."""
    return load_tokenizer(resolve_model_dir("smollm2-135m"))


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_prompts_other_seed_other_prompts(tok, task):
    a = build_samples(task, tok, 512, 2, seed=7)
    b = build_samples(task, tok, 512, 2, seed=7)
    c = build_samples(task, tok, 512, 2, seed=8)
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b]
    assert [s.expected for s in a] == [s.expected for s in b]
    for x, y in zip(a, c):
        assert x.prompt_ids != y.prompt_ids


def test_more_samples_keep_the_earlier_ones_prompts(tok):
    # depths spread over the sample count, so only the first (depth 0) is shared
    assert build_samples("vt", tok, 512, 1, 3)[0].prompt_ids == build_samples("vt", tok, 512, 4, 3)[0].prompt_ids


@pytest.mark.parametrize("length", [256, 1024, 4096])
@pytest.mark.parametrize("task", GEN_TASKS)
def test_prompt_plus_answer_fills_the_length(tok, task, length):
    for s in build_samples(task, tok, length, 2, seed=0):
        assert len(s.prompt_ids) + s.max_tokens == length
        assert s.max_tokens == MAX_TOKENS[task]
        # pieces are tokenized separately: the text must re-tokenize to nearly the same count
        retokenized = len(tok(tok.decode(s.prompt_ids), add_special_tokens=False)["input_ids"])
        assert abs(retokenized + s.max_tokens - length) <= 0.02 * length


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue"])
def test_needle_sits_at_the_requested_depth(tok, task):
    samples = build_samples(task, tok, 2048, 5, seed=1)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for s in samples:
        start, end = s.context
        needle_start, needle_end = s.needle_spans[0]
        filler_tokens = (end - start) - sum(b - a for a, b in s.needle_spans)
        before = needle_start - start - sum(b - a for a, b in s.needle_spans if b <= needle_start)
        # needles go between sentences: off by at most one natural-text sentence
        assert abs(before / filler_tokens - s.depth) < 0.04, (s.index, before, filler_tokens)
        assert start <= needle_start < needle_end <= end


def test_needle_haystacks_alternate_repeated_and_natural(tok):
    samples = build_samples("niah_single", tok, 512, 4, seed=0)
    assert [s.haystack for s in samples] == ["repeated", "natural", "repeated", "natural"]
    natural = tok.decode(samples[1].prompt_ids[slice(*samples[1].context)])
    assert "The grass is green" not in natural
    assert any(sentence[:40] in natural for sentence in prose_sentences())


def test_expected_answers_are_in_the_prompt(tok):
    for s in build_samples("passkey", tok, 1024, 3, seed=2):
        text = tok.decode(s.prompt_ids)
        k = s.expected[0]
        assert re.fullmatch(r"\d{5}", k)
        assert f"The pass key is {k}. Remember it. {k} is the pass key." in text
        assert text.endswith("What is the pass key? The pass key is")
    for task in ["niah_single", "niah_multikey", "niah_multivalue"]:
        for s in build_samples(task, tok, 1024, 3, seed=2):
            text = tok.decode(s.prompt_ids)
            key = re.search(r"The special magic numbers for (\S+) mentioned in the provided text are$", text).group(1)
            found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d{{7}})\.", text)
            assert found and sorted(found) == sorted(s.expected)
            assert len(re.findall(r"One of the special magic numbers", text)) == (1 if task == "niah_single" else 4)


def test_variable_chain_resolves_to_the_expected_names(tok):
    for s in build_samples("vt", tok, 1024, 3, seed=4):
        text = tok.decode(s.prompt_ids)
        value = re.search(r"assigned the value (\d{5}) in the text above", text).group(1)
        equal = set()
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", text):
            if rhs == value or rhs[4:] in equal:
                equal.add(name)
        assert sorted(equal) == sorted(s.expected) and len(equal) == 5


def test_ppl_window_is_a_slice_of_the_pydoc_corpus(tok):
    ids = corpus_ids(tok)
    for s in build_samples("ppl", tok, 300, 2, seed=0):
        assert len(s.prompt_ids) == 300 and s.expected == [] and s.max_tokens == 1
        n = len(s.prompt_ids)
        assert any(list(ids[i : i + n]) == s.prompt_ids for i in range(len(ids) - n + 1) if ids[i] == s.prompt_ids[0])


def test_chat_format_wraps_the_question_in_the_template(tok):
    s = build_samples("passkey", tok, 512, 1, seed=0, fmt="chat")[0]
    text = tok.decode(s.prompt_ids)
    assert text.startswith("<|im_start|>system") and len(s.prompt_ids) + s.max_tokens == 512
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")


def test_uuid_keys_replace_word_pairs(tok):
    s = build_samples("niah_multikey", tok, 1024, 1, seed=0, keys="uuids")[0]
    keys = re.findall(r"magic numbers for ([0-9a-f-]{36}) is", tok.decode(s.prompt_ids))
    assert len(set(keys)) == 4


def test_bad_inputs_raise_value_errors_naming_them(tok):
    with pytest.raises(ValueError, match="too short"):
        build_samples("niah_multivalue", tok, 64, 1, seed=0)
    with pytest.raises(ValueError, match="'nope'"):
        build_samples("nope", tok, 512, 1, seed=0)
    with pytest.raises(ValueError, match="format 'xml'"):
        build_samples("passkey", tok, 512, 1, seed=0, fmt="xml")
