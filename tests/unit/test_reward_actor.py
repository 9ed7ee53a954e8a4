"""Reward isolation in the reward actor (a plain class here; the integration tests run it as a Ray actor):
a reward that raises, hangs, returns NaN/None or the wrong number of scores costs its samples the fallback score
and is named in ``failed``; the other rewards' scores and the weighted total are kept."""

from __future__ import annotations

import math
import time

import pytest

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor

PROMPTS, RESPONSES, ROWS = ["ab=", "cd="], ["ba", "xx"], [{"prompt": "ab=", "answer": "ba"},
                                                        {"prompt": "cd=", "answer": "dc"}]


def raises(prompts, responses, **_):
    raise RuntimeError("boom")


def hangs(prompts, responses, **_):
    time.sleep(5)
    return [1.0] * len(responses)


def nan_and_none(prompts, responses, **_):
    return [math.nan, None]


def too_few(prompts, responses, **_):
    return [1.0]


def constant(prompts, responses, *, value, **_):
    return [value] * len(responses)


def actor(*functions: tuple[str, float, dict], timeout_s: float = 1.0, fallback: float = -1.0) -> RewardActor:
    fns = [RewardFnConfig(name=name, weight=weight, args=args) for name, weight, args in functions]
    return RewardActor(RewardConfig(functions=fns, timeout_s=timeout_s, fallback=fallback))


def test_weighted_total_of_components():
    a = actor(("exact_match", 2.0, {}), (f"{__name__}:constant", 0.5, {"value": 0.4}))
    scored, _ = a.score(PROMPTS, RESPONSES, ROWS)
    # row 0: 2.0 * 1 + 0.5 * 0.4 = 2.2; row 1: 2.0 * 0 + 0.5 * 0.4 = 0.2
    assert [s.total for s in scored] == pytest.approx([2.2, 0.2], abs=1e-12)
    assert scored[0].components == {"exact_match": 1.0, f"{__name__}:constant": 0.4}
    assert all(not s.failed for s in scored)


@pytest.mark.parametrize("bad", ["raises", "nan_and_none", "too_few", "hangs"])
def test_a_failing_reward_gets_the_fallback_and_is_named(bad):
    name = f"{__name__}:{bad}"
    a = actor(("exact_match", 1.0, {}), (name, 1.0, {}), timeout_s=0.5, fallback=-1.0)
    start = time.perf_counter()
    scored, _ = a.score(PROMPTS, RESPONSES, ROWS)
    assert time.perf_counter() - start < 3.0  # a hung reward is abandoned at the timeout, not waited for
    # exact_match still counts: row 0 = 1 + (-1) = 0.0, row 1 = 0 + (-1) = -1.0
    assert [s.total for s in scored] == pytest.approx([0.0, -1.0], abs=1e-12)
    assert all(s.failed == [name] for s in scored)
    assert all(s.components[name] == -1.0 for s in scored)


def test_named_components_are_kept_beside_the_score():
    actor = RewardActor(RewardConfig(functions=[RewardFnConfig(name="json_schema")]))
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    rows = [{"prompt": "p", "schema": schema, "answer": {"name": "Ann", "age": 30}}] * 2
    scored, _ = actor.score(["p", "p"], ['{"name": "ann", "age": "30"}', "no json"], rows)
    # response 0: parses 1, schema 0 (age is a string), keys 2/2, content 1/2 (the string "30" is not 30)
    assert scored[0].components == pytest.approx({"json_schema.parses": 1.0, "json_schema.schema": 0.0,
                                                  "json_schema.keys": 1.0, "json_schema.content": 0.5,
                                                  "json_schema": 0.1 * 1 + 0.3 * 0 + 0.2 * 1 + 0.4 * 0.5})
    assert scored[0].total == pytest.approx(0.1 + 0.2 + 0.2)
    assert scored[1].total == 0.0 and scored[1].failed == []
