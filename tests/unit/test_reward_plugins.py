"""The reward plugin shapes: a class built once with the config's args, an async function, a per-sample function;
each through the reward actor as a run uses it."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor
from rewards.registry import check_args, load, per_sample

pytestmark = pytest.mark.timeout(60)


class Scaled:
    built = 0

    def __init__(self, factor: float = 1.0):
        Scaled.built += 1
        self.factor = factor

    def __call__(self, prompts, responses, answer, **_):
        return [self.factor * float(r == a) for r, a in zip(responses, answer)]


async def slow_len(prompts, responses, *, scale=1.0, **_):
    async def one(r):
        await asyncio.sleep(0.01)
        return scale * len(r)

    return list(await asyncio.gather(*map(one, responses)))


@per_sample
def picky(prompt, response, answer, *, bonus=0.0):
    if response == "boom":
        raise RuntimeError("this sample breaks the function")
    return float(response == answer) + bonus


@pytest.fixture
def user_module(monkeypatch):
    mod = types.ModuleType("plugin_rewards")
    mod.Scaled, mod.slow_len, mod.picky = Scaled, slow_len, picky
    monkeypatch.setitem(sys.modules, "plugin_rewards", mod)
    Scaled.built = 0
    return mod


def actor(*functions: RewardFnConfig) -> RewardActor:
    return RewardActor(RewardConfig(functions=list(functions), timeout_s=5.0, fallback=-1.0))


def test_class_is_built_once_with_args_and_called_per_batch(user_module):
    a = actor(RewardFnConfig(name="plugin_rewards:Scaled", args={"factor": 3.0}))
    for _ in range(3):
        scored, _ = a.score(["p", "p"], ["x", "y"], [{"answer": "x"}, {"answer": "x"}])
        assert [s.total for s in scored] == [3.0, 0.0]
    assert Scaled.built == 1


def test_class_with_a_wrong_arg_names_the_reward(user_module):
    with pytest.raises(TypeError, match=r"plugin_rewards:Scaled.*factr"):
        load("plugin_rewards:Scaled", {"factr": 2})


def test_async_function_is_awaited(user_module):
    a = actor(RewardFnConfig(name="plugin_rewards:slow_len", args={"scale": 0.5}))
    scored, _ = a.score(["p"] * 3, ["ab", "abcd", ""], [{}] * 3)
    assert [s.total for s in scored] == [1.0, 2.0, 0.0]
    assert not any(s.failed for s in scored)


def test_per_sample_failure_is_that_sample_only_and_args_bind_to_the_function(user_module):
    a = actor(RewardFnConfig(name="plugin_rewards:picky", args={"bonus": 0.25}))
    rows = [{"answer": "x", "unused": 1}, {"answer": "x", "unused": 2}, {"answer": "y", "unused": 3}]
    scored, _ = a.score(["p"] * 3, ["x", "boom", "x"], rows)
    # sample 2 raised: fallback -1.0 and a counted failure; the others: 1 + 0.25 and 0 + 0.25
    assert [s.total for s in scored] == [1.25, -1.0, 0.25]
    assert [s.failed for s in scored] == [[], ["plugin_rewards:picky"], []]


def test_per_sample_called_directly_passes_only_the_fields_it_takes():
    assert picky(["p"], ["x"], answer=["x"], schema=[{"a": 1}]) == [1.0]


def test_check_args_catches_a_wrong_argument_before_anything_is_built(user_module):
    check_args("plugin_rewards:Scaled", {"factor": 2.0})
    check_args("plugin_rewards:picky", {"bonus": 1.0})
    with pytest.raises(TypeError, match="factr"):
        check_args("plugin_rewards:Scaled", {"factr": 2.0})
    with pytest.raises(TypeError, match="bonsu"):
        check_args("plugin_rewards:picky", {"bonsu": 1.0})
    assert Scaled.built == 0
