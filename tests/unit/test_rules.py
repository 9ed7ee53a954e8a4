"""The rule rewards (exact_match, char_match, choice, length_penalty) on hand-worked cases."""

from __future__ import annotations

import pytest

from rewards.rules import char_match, choice, exact_match, length_penalty, picked_label, picked_option


def test_exact_match_normalisation_options():
    assert exact_match(["q"] * 2, [" Ba ", "b  a"], answer=["Ba", "B a"]) == [1.0, 0.0]
    assert exact_match(["q"] * 2, [" ba ", "b  a"], answer=["Ba", "B a"], lowercase=True,
                       collapse_spaces=True) == [1.0, 1.0]
    assert exact_match(["q"], [" ba"], answer=["ba"], strip=False) == [0.0]


def test_char_match_partial_credit():
    assert char_match(["q"] * 3, ["cba", "cbx", "cbaaaa"], answer=["cba"] * 3) == [1.0, 2 / 3, 1.0]


@pytest.mark.parametrize("response, pick", [
    ("Answer: B", "B"), ("b", "B"), ("(C)", "C"), ("D. because it is", "D"), ("I think the answer is (c).", "C"),
    ("answer: A ... on reflection the answer is B", "B"),  # the last one counts
    ("A or B", None), ("the answer is a function", None), ("Answer: I'm not sure", None), ("", None),
])
def test_picked_option(response, pick):
    assert picked_option(response) == pick


def test_choice_with_letters_and_with_labels():
    assert choice(["q"] * 3, ["Answer: B", "b", "A or B"], answer=["B", "B", "B"]) == [1.0, 1.0, 0.0]
    labels = ["positive", "negative", "neutral"]
    responses = ["Negative", "It reads as negative to me.", "positive or negative", "non-negative", "neutral."]
    assert choice(["q"] * 5, responses, answer=["negative"] * 4 + ["neutral"], labels=labels) == \
        [1.0, 1.0, 0.0, 0.0, 1.0]  # "non-negative" names no label
    assert picked_label("positive or negative", labels) is None


def test_length_penalty_is_linear_between_target_and_limit():
    # words: 2 -> 1.0; 4 -> 1 - (4-2)/(6-2) = 0.5; 7 -> 0.0 (clipped)
    assert length_penalty(["q"] * 3, ["a b", "a b c d", "a b c d e f g"], target=2, limit=6) == [1.0, 0.5, 0.0]
    assert length_penalty(["q"], ["abcde"], target=3, limit=7, unit="chars") == [0.5]
    with pytest.raises(ValueError, match="unit"):
        length_penalty(["q"], ["a"], unit="tokens")
    with pytest.raises(ValueError, match="target < limit"):
        length_penalty(["q"], ["a"], target=5, limit=5)
