"""The math reward: symbolic equivalence by math-verify, run in the sandbox, with hostile answers."""

from __future__ import annotations

import time

import pytest

from rewards.execution import math_answer

pytestmark = pytest.mark.timeout(180)


def test_equivalent_answers_score_one_and_wrong_ones_zero():
    gold = ["3", "\\frac{1}{2}", "x^2+2x+1", "2", "7", "\\sqrt{2}"]
    responses = ["The answer is 3.", "so $x = 0.5$", "$\\boxed{(x+1)^2}$", "3, no wait: \\boxed{2}",
                 "it is 8", ""]
    assert math_answer([""] * 6, responses, answer=gold) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_an_answer_that_hangs_the_checker_costs_only_itself():
    # 9^(9^9) has 369 million digits: SymPy works on it in C code, where no alarm reaches it; the harness's child
    # for that item is killed at per_item_s and the next item is checked in the same sandbox
    responses = ["\\boxed{4}", "\\boxed{9^{9^{9}}}", "\\boxed{5}"]
    start = time.monotonic()
    assert math_answer([""] * 3, responses, answer=["4", "1", "5"], per_item_s=1, timeout_s=60) == [1.0, 0.0, 1.0]
    assert time.monotonic() - start < 20
    # the batch's own time runs out first: what was not checked is the reward's failure (None), not a 0 for the model
    assert math_answer([""] * 3, responses, answer=["4", "1", "5"], per_item_s=100, timeout_s=6) == [1.0, None, None]


def test_hostile_answers_in_a_batch_fail_alone_within_the_batch_timeout():
    honest = [("\\boxed{\\frac{1}{2}}", "0.5"), ("so it is 12", "12"), ("$x = 3$", "4")]
    hostile = [("The answer is 9**9**9**9", "1"), ("\\boxed{9^{9^{9^{9}}}}", "2"), ("{" * 5000 + "1", "1"),
               ("\\boxed{" + "\\sqrt{" * 2000 + "2" + "}" * 2001, "2"), ("1" * 100_000, "1"),
               ("\ud800 \\boxed{7}", "7")]
    rows = [hostile[0], honest[0], hostile[1], hostile[2], honest[1], hostile[3], hostile[4], honest[2], hostile[5]]
    start = time.monotonic()
    scores = math_answer([""] * len(rows), [r for r, _ in rows], answer=[a for _, a in rows], per_item_s=1)
    assert time.monotonic() - start < 6 + len(rows)  # the checker's start, then at most per_item_s an answer
    assert [scores[1], scores[4], scores[7]] == [1.0, 1.0, 0.0]  # the honest rows keep their exact scores
    assert [scores[i] for i in (0, 2, 3, 5, 6)] == [0.0] * 5


def test_code_in_the_answer_is_not_run_outside_the_sandbox(tmp_path):
    target = tmp_path / "pwned"
    evil = f"\\boxed{{__import__('os').system('touch {target}')}}"
    assert math_answer([""], [evil], answer=["0"]) == [0.0]
    assert not target.exists()
