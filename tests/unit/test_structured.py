"""json_schema: each component against hand-worked cases, including malformed, truncated and huge responses."""

from __future__ import annotations

import json

import pytest

from rewards.structured import content_score, extract_json, json_schema

SCHEMA = {"type": "object", "required": ["city", "temp", "tags"],
          "properties": {"city": {"type": "string"}, "temp": {"type": "number"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = {"city": "Oslo", "temp": -3.5, "tags": ["cold", "dark"]}


def one(response, schema=SCHEMA, answer=ANSWER, **kw):
    return json_schema([""], [response], schema=[schema], answer=[answer], **kw)[0]


def test_perfect_answer_in_a_fence_scores_one():
    r = one('Sure:\n```json\n{"city": "oslo ", "temp": -3.5000000001, "tags": ["Cold", "dark"]}\n```')
    assert r == {"score": pytest.approx(1.0), "parses": 1.0, "schema": 1.0, "keys": 1.0, "content": 1.0}


def test_components_of_a_partly_right_answer():
    # parses 1; schema 0 (temp is a string); keys 2/3 (tags missing); content: city right, temp "cold" wrong,
    # tags[0], tags[1] missing -> 1/4. Score = 0.1*1 + 0.3*0 + 0.2*(2/3) + 0.4*(1/4) = 0.3333...
    r = one('The result is {"city": "Oslo", "temp": "cold"} as asked.')
    assert r == pytest.approx({"score": 0.1 + 0.2 * 2 / 3 + 0.4 / 4, "parses": 1.0, "schema": 0.0,
                               "keys": 2 / 3, "content": 0.25})


@pytest.mark.parametrize("bad", ['{"city": "Oslo", "temp": ', "", "not json at all", "{" * 5000 + "}" * 5000,
                                 '{"city": "Oslo"' + " " * 200_000 + "}"])
def test_malformed_truncated_deep_or_huge_responses_score_zero(bad):
    assert one(bad) == {"score": 0.0, "parses": 0.0, "schema": 0.0, "keys": 0.0, "content": 0.0}


def test_weights_are_configurable_and_checked():
    r = one('{"city": "Oslo", "temp": "cold"}', weights={"parses": 0.0, "schema": 0.0, "keys": 1.0, "content": 0.0})
    assert r["score"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown components.*'valid'"):
        one("{}", weights={"valid": 1.0})


def test_schema_and_answer_may_be_json_strings_and_a_broken_schema_is_the_rows_fault():
    r = json_schema([""] * 2, ['{"city": "Oslo", "temp": -3.5, "tags": []}'] * 2,
                    schema=[json.dumps(SCHEMA), {"type": "no-such-type"}], answer=[json.dumps(ANSWER), ANSWER])
    assert r[0]["schema"] == 1.0 and r[0]["content"] == pytest.approx(2 / 4)
    assert r[1] is None


def test_without_an_answer_content_follows_the_schema():
    r = json_schema([""], ['{"city": "x", "temp": 1, "tags": []}'], schema=[SCHEMA])[0]
    assert r["content"] == 1.0 and r["score"] == pytest.approx(1.0)


def test_extract_json_and_content_score_edges():
    assert extract_json('[1, 2] trailing') == [1, 2]
    assert content_score({"a": True}, {"a": 1}) == 0.0  # true is not 1 in JSON
    assert content_score({"a": None}, {"a": None}) == 1.0
    assert content_score([1, 2, 3], [1, 2]) == 1.0 and content_score([2, 1], [1, 2]) == 0.0
