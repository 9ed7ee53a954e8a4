"""The reward plugin shapes: a class built once with the config's args, an async function, a per-sample function;
each through the reward actor as a run uses it (in the reward's own process, which imports this module by its
``module:attr`` name as a user's module would be)."""

from __future__ import annotations

import asyncio
import os

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
        return [{"score": self.factor * float(r == a), "built": Scaled.built, "pid": os.getpid()}
                for r, a in zip(responses, answer)]


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


HERE = __name__  # the module name the reward processes import, e.g. "test_reward_plugins"


def actor(*functions: RewardFnConfig) -> RewardActor:
    return RewardActor(RewardConfig(functions=list(functions), timeout_s=5.0, fallback=-1.0))


def test_class_is_built_once_with_args_and_called_per_batch():
    a = actor(RewardFnConfig(name=f"{HERE}:Scaled", args={"factor": 3.0}))
    pids = set()
    for _ in range(3):
        scored, _ = a.score(["p", "p"], ["x", "y"], [{"answer": "x"}, {"answer": "x"}])
        assert [s.total for s in scored] == [3.0, 0.0]
        assert [s.components[f"{HERE}:Scaled.built"] for s in scored] == [1.0, 1.0]  # one instance ...
        pids |= {s.components[f"{HERE}:Scaled.pid"] for s in scored}
    assert len(pids) == 1  # ... in one process, reused for every batch
    a.shutdown()


def test_class_with_a_wrong_arg_names_the_reward():
    with pytest.raises(TypeError, match=rf"{HERE}:Scaled.*factr"):
        load(f"{HERE}:Scaled", {"factr": 2})


def test_async_function_is_awaited():
    a = actor(RewardFnConfig(name=f"{HERE}:slow_len", args={"scale": 0.5}))
    scored, _ = a.score(["p"] * 3, ["ab", "abcd", ""], [{}] * 3)
    assert [s.total for s in scored] == [1.0, 2.0, 0.0]
    assert not any(s.failed for s in scored)
    a.shutdown()


def test_per_sample_failure_is_that_sample_only_and_args_bind_to_the_function():
    a = actor(RewardFnConfig(name=f"{HERE}:picky", args={"bonus": 0.25}))
    rows = [{"answer": "x", "unused": 1}, {"answer": "x", "unused": 2}, {"answer": "y", "unused": 3}]
    scored, _ = a.score(["p"] * 3, ["x", "boom", "x"], rows)
    # sample 2 raised: fallback -1.0 and a counted failure; the others: 1 + 0.25 and 0 + 0.25
    assert [s.total for s in scored] == [1.25, -1.0, 0.25]
    assert [s.failed for s in scored] == [[], [f"{HERE}:picky"], []]
    a.shutdown()


def test_per_sample_called_directly_passes_only_the_fields_it_takes():
    assert picky(["p"], ["x"], answer=["x"], schema=[{"a": 1}]) == [1.0]


def test_check_args_catches_a_wrong_argument_before_anything_is_built():
    check_args(f"{HERE}:Scaled", {"factor": 2.0})
    check_args(f"{HERE}:picky", {"bonus": 1.0})
    with pytest.raises(TypeError, match="factr"):
        check_args(f"{HERE}:Scaled", {"factr": 2.0})
    with pytest.raises(TypeError, match="bonsu"):
        check_args(f"{HERE}:picky", {"bonsu": 1.0})
    assert Scaled.built == 0  # in this process: the reward processes of the other tests built theirs


def test_a_reward_that_needs_the_actor_process_cannot_be_configured_into_its_own():
    from rewards.registry import isolation

    assert isolation("judge") == "thread" and isolation("exact_match") == "process"
    assert isolation("exact_match", "thread") == "thread"
    with pytest.raises(ValueError, match="must run in the reward actor's own process"):
        isolation("judge", "process")
