"""A reward declares the config ``args`` it takes (keyword-only parameters, or a class's ``__init__``), and
check_args, load and the run's start refuse others and values of the wrong type, naming the reward and the arg;
row fields still reach the positional parameters and the ``**row_fields`` catch-all."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import pytest

from actors.cli import main
from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor
from rewards.registry import RewardArgError, check_args, load

pytestmark = pytest.mark.timeout(60)

HERE = __name__  # what the reward processes import
SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def with_fields(prompts, responses, answer, *, scale: float = 1.0, count: int = 1,
                unit: Literal["words", "chars"] = "words", tags: Optional[list[str]] = None,
                opaque: tuple[int, int] = (0, 0), **row_fields):
    """scale * exact match, with the row fields it got besides ``answer`` as a component."""
    return [{"score": scale * float(r == a), "extra": float(len(row_fields)), "scale_col": float("scale" in row_fields)}
            for r, a in zip(responses, answer)]


def no_catch_all(prompts, responses, answer, *, bonus: float = 0.0):
    return [float(r == a) + bonus for r, a in zip(responses, answer)]


def needs_keywords(prompts, responses, *, keywords: list[str], **_):
    return [float(any(k in r for k in keywords)) for r in responses]


class Built:
    def __init__(self, factor: float, *, name: str = "x"):
        self.factor = factor

    def __call__(self, prompts, responses, **fields):
        return [self.factor] * len(responses)


def refused(name: str, args: dict, arg: str) -> str:
    with pytest.raises(RewardArgError) as info:
        check_args(name, args)
    assert info.value.arg == arg and f"reward '{name}'" in str(info.value) and f"'{arg}'" in str(info.value)
    return str(info.value)


def test_a_misspelt_arg_is_refused_for_a_built_in_and_for_a_user_reward_with_row_fields():
    assert "it takes ['collapse_spaces', 'lowercase', 'strip']" in refused("exact_match", {"lowercse": True},
                                                                           "lowercse")
    refused("code_exec", {"memroy_mb": 512}, "memroy_mb")  # execution.py's signature as it is
    refused("judge", {"model": "/m", "temprature": 0.0}, "temprature")  # a class: its __init__'s parameters
    refused(f"{HERE}:with_fields", {"scael": 2.0}, "scael")  # **row_fields takes row fields, not args
    refused(f"{HERE}:Built", {"factor": 1.0, "nmae": "y"}, "nmae")


def test_a_positional_parameter_is_a_row_field_not_an_arg():
    assert "declare it after `*`" in refused(f"{HERE}:with_fields", {"answer": "x"}, "answer")
    assert "declare it after `*`" in refused("code_exec", {"tests": []}, "tests")


@pytest.mark.parametrize("name, args, arg, expected, got", [
    ("code_exec", {"memory_mb": "512"}, "memory_mb", "int", "str '512'"),
    ("math", {"memory_mb": "2048"}, "memory_mb", "int", "str '2048'"),
    (f"{HERE}:with_fields", {"count": True}, "count", "int", "bool True"),  # a bool is not an int ...
    ("code_exec", {"timeout_s": False}, "timeout_s", "float", "bool False"),  # ... nor a float
    (f"{HERE}:with_fields", {"count": 2.5}, "count", "int", "float 2.5"),
    ("exact_match", {"lowercase": "yes"}, "lowercase", "bool", "str 'yes'"),
    ("choice", {"labels": ["pos", 1]}, "labels", "list[str] | None", "list ['pos', 1]"),
    ("choice", {"labels": "pos"}, "labels", "list[str] | None", "str 'pos'"),
    ("json_schema", {"weights": {"parses": "high"}}, "weights", "dict[str, float] | None", "dict"),
    ("similarity", {"max_length": "256"}, "max_length", "int", "str '256'"),
    (f"{HERE}:with_fields", {"unit": "tokens"}, "unit", "Literal['words', 'chars']", "str 'tokens'"),
    (f"{HERE}:with_fields", {"tags": [1]}, "tags", "Optional[list[str]]", "list [1]"),
    (f"{HERE}:Built", {"factor": "2"}, "factor", "float", "str '2'"),
])
def test_an_arg_of_the_wrong_type_is_refused_naming_both_types(name, args, arg, expected, got):
    message = refused(name, args, arg)
    assert f"must be {expected}, got {got}" in message


@pytest.mark.parametrize("name, args", [
    ("exact_match", {"lowercase": True, "strip": False, "collapse_spaces": True}),
    ("code_exec", {"timeout_s": 3, "per_test_s": 0.5, "memory_mb": 512, "partial": False}),  # an int is a float
    ("sql_exec", {"query_s": 1}),
    ("math", {"per_item_s": 2, "memory_mb": 1024}),
    ("choice", {"labels": ["positive", "negative"]}),
    ("choice", {"labels": None}),
    ("json_schema", {"weights": {"parses": 1, "content": 0.5}}),
    ("length_penalty", {"target": 10, "limit": 20, "unit": "chars"}),
    ("similarity", {"field": "reference", "max_length": 128, "model": None}),
    # opaque: a tuple annotation is not checked (a YAML list for it passes)
    (f"{HERE}:with_fields", {"scale": 2, "count": 3, "unit": "chars", "tags": None, "opaque": [1, 2]}),
    (f"{HERE}:Built", {"factor": 2.0, "name": "y"}),
])
def test_args_of_the_declared_types_are_accepted(name, args):
    check_args(name, args)


def test_a_required_arg_must_be_given():
    refused(f"{HERE}:needs_keywords", {}, "keywords")
    refused(f"{HERE}:Built", {}, "factor")
    check_args(f"{HERE}:needs_keywords", {"keywords": ["paris"]})


def test_load_binds_args_as_check_args_says():
    with pytest.raises(RewardArgError, match="lowercse"):
        load("exact_match", {"lowercse": True})
    with pytest.raises(RewardArgError, match="memory_mb"):
        load("code_exec", {"memory_mb": "512"})
    fn = load(f"{HERE}:with_fields", {"scale": 2.0})
    # a column named like an arg does not override it; the others reach **row_fields
    out = fn(["p", "p"], ["x", "y"], answer=["x", "x"], scale=[5.0, 5.0], level=[1, 2])
    assert out == [{"score": 2.0, "extra": 1.0, "scale_col": 0.0}, {"score": 0.0, "extra": 1.0, "scale_col": 0.0}]
    # without a catch-all, a function gets the columns it names and no others
    assert load(f"{HERE}:no_catch_all", {"bonus": 0.5})(["p"], ["x"], answer=["x"], level=[1]) == [1.5]


def test_a_user_rewards_row_fields_arrive_through_the_reward_process():
    actor = RewardActor(RewardConfig(functions=[RewardFnConfig(name=f"{HERE}:with_fields", args={"scale": 3.0}),
                                                RewardFnConfig(name=f"{HERE}:no_catch_all")]))
    try:
        rows = [{"prompt": "p", "answer": "x", "level": 1, "topic": "t", "scale": 9.0},
                {"prompt": "p", "answer": "x", "level": 2, "topic": "t", "scale": 9.0}]
        scored, _ = actor.score(["p", "p"], ["x", "y"], rows)
        # with_fields: 3 * match; it saw level and topic (not answer, a parameter; not scale, an arg)
        assert [s.components[f"{HERE}:with_fields"] for s in scored] == [3.0, 0.0]
        assert [s.components[f"{HERE}:with_fields.extra"] for s in scored] == [2.0, 2.0]
        assert [s.components[f"{HERE}:with_fields.scale_col"] for s in scored] == [0.0, 0.0]
        assert [s.components[f"{HERE}:no_catch_all"] for s in scored] == [1.0, 0.0]
        assert not any(s.failed for s in scored)
    finally:
        actor.shutdown()


def test_a_bad_arg_stops_the_run_start_naming_its_key(capsys, tmp_path):
    for args, key, what in [("{lowercse: true}", "reward.functions[1].args.lowercse", "takes no arg 'lowercse'"),
                            ("{lowercase: maybe}", "reward.functions[1].args.lowercase", "must be bool, got str")]:
        override = f"reward.functions=[{{name: char_match}}, {{name: exact_match, args: {args}}}]"
        assert main(["train", SMOKE, "--run-dir", str(tmp_path / "run"), override]) == 2
        err = capsys.readouterr().err
        assert f"config key '{key}'" in err and what in err, err
