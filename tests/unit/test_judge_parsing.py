"""The judge's strict verdict parsing and template checks (no engine: tests/integration/test_judge.py runs one)."""

from __future__ import annotations

import pytest

from rewards.judge import DEFAULT_PATTERN, compile_pattern, parse_verdict, template_fields
from rewards.registry import check_args

P = compile_pattern(DEFAULT_PATTERN)


@pytest.mark.parametrize("verdict, score", [
    ("Score: 7", 0.7),
    ("The answer is right.\nScore: 10\n", 1.0),
    ("Score:0", 0.0),
    ("Score: 2.5", 0.25),
    ("  Score:   9  trailing words", 0.9),
])
def test_one_verdict_in_range_is_scaled_to_unit(verdict, score):
    assert parse_verdict(verdict, P, 0, 10) == pytest.approx(score, abs=1e-12)


@pytest.mark.parametrize("verdict", [
    "",  # nothing
    "7",  # no "Score:"
    "score: 7",  # the pattern is case sensitive, as written
    "Score: seven",
    "Score: 7\nScore: 9",  # two verdicts: ambiguous, even if they agreed
    "Score: 7 Score: 7",
    "Score: 11",  # out of range
    "Score: -1",
    "Score: 99999999999999999999999999999999999999",
    "Score: " + "9" * 5000,  # a huge number is out of range, not an error
])
def test_anything_else_is_no_score(verdict):
    assert parse_verdict(verdict, P, 0, 10) is None


def test_a_custom_range_and_pattern():
    p = compile_pattern(r"\[\[(\d+)\]\]")  # MT-Bench's "[[N]]"
    assert parse_verdict("Rating: [[4]]", p, 1, 5) == pytest.approx(0.75)  # (4 - 1) / (5 - 1)
    assert parse_verdict("Rating: [[0]]", p, 1, 5) is None


def test_template_fields_are_plain_names_and_include_the_response():
    assert template_fields("Q: {prompt}\nRef: {answer}\nA: {response}") == {"prompt", "answer", "response"}
    assert template_fields("{response} and {{literal braces}}") == {"response"}
    for bad in ("{prompt}", "{response} {0}", "{response} {}", "{response} {answer.upper}", "{response} {a[0]}",
                "{response"):
        with pytest.raises(ValueError):
            template_fields(bad)


def test_a_pattern_needs_exactly_one_group():
    for bad in ("Score: \\d+", "(a)(b)", "(unclosed"):
        with pytest.raises(ValueError):
            compile_pattern(bad)


def test_bad_judge_args_fail_at_check_before_any_engine(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check_args("judge", {"model": str(tmp_path)})
    for args, match in [({"model": str(tmp_path), "template": "{prompt}"}, "response"),
                        ({"model": str(tmp_path), "pattern": "x"}, "capture group"),
                        ({"model": str(tmp_path), "min_score": 5, "max_score": 5}, "below"),
                        ({"model": str(tmp_path / "nope")}, "config.json"),
                        ({"model": str(tmp_path), "tempalte": "{response}"}, "tempalte")]:
        with pytest.raises(TypeError, match=match):
            check_args("judge", args)
