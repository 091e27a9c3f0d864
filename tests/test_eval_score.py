"""Scores for `headwise eval`: exact values on small hand-made inputs."""

from __future__ import annotations

import math

import pytest

from headwise.clients.eval.score import (
    corpus_perplexity,
    greedy_agreement,
    mean_nll,
    perplexity,
    string_match_all,
    top1_agreement,
)


def test_string_match_all_counts_the_fraction_found_case_insensitively():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all("ABCDE, fghij and xyz", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert string_match_all("", ["1"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_perplexity_skips_the_first_token_and_exponentiates_the_mean_nll():
    lps = [None, math.log(0.5), math.log(0.25)]
    assert mean_nll(lps) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert perplexity(lps) == pytest.approx(math.sqrt(8))
    assert perplexity([None, 0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        perplexity([None, None, -1.0])


def test_corpus_perplexity_is_the_geometric_mean_of_window_perplexities():
    assert corpus_perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)


def test_greedy_agreement_is_the_common_prefix_over_the_full_length():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert greedy_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert greedy_agreement([7, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert greedy_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # stopped early
    assert greedy_agreement([1, 2, 3, 4, 5], [1, 2, 3, 4]) == 1.0  # ran on past full's stop
    assert greedy_agreement([], []) == 1.0


def test_top1_agreement_is_the_fraction_of_matching_positions():
    assert top1_agreement([5, 6, 7, 8], [5, 0, 7, 0]) == 0.5
    with pytest.raises(ValueError):
        top1_agreement([1], [1, 2])
