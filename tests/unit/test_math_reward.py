"""The math reward: symbolic equivalence by math-verify, run in the sandbox, with hostile answers."""

from __future__ import annotations

import pytest

from rewards.execution import math_answer

pytestmark = pytest.mark.timeout(180)


def test_equivalent_answers_score_one_and_wrong_ones_zero():
    gold = ["3", "\\frac{1}{2}", "x^2+2x+1", "2", "7", "\\sqrt{2}"]
    responses = ["The answer is 3.", "so $x = 0.5$", "$\\boxed{(x+1)^2}$", "3, no wait: \\boxed{2}",
                 "it is 8", ""]
    assert math_answer([""] * 6, responses, answer=gold) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_an_answer_that_hangs_the_checker_costs_only_itself():
    # 9^(9^9) has 369 million digits: SymPy works on it until an alarm or the wall clock stops it
    responses = ["\\boxed{4}", "\\boxed{9^{9^{9}}}", "\\boxed{5}"]
    # the per-item alarm stops it, in the same sandbox
    assert math_answer([""] * 3, responses, answer=["4", "1", "5"], per_item_s=1, timeout_s=60) == [1.0, 0.0, 1.0]
    # no alarm in time (as for a hang in C code): the sandbox is killed at the wall clock, that answer scores 0,
    # the ones after it are checked in a fresh sandbox
    assert math_answer([""] * 3, responses, answer=["4", "1", "5"], per_item_s=100, timeout_s=4) == [1.0, 0.0, 1.0]


def test_code_in_the_answer_is_not_run_outside_the_sandbox(tmp_path):
    target = tmp_path / "pwned"
    evil = f"\\boxed{{__import__('os').system('touch {target}')}}"
    assert math_answer([""], [evil], answer=["0"]) == [0.0]
    assert not target.exists()
