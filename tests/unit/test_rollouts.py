"""actors/rollouts.py's RolloutMaker with stand-in engine and reward groups (the real ones run in the integration
tests): which groups dynamic sampling keeps and refills, that the refill is determined by (seed, step, round), that
the overlong penalty neither decides uniformity nor escapes the record, and what reward_mean averages."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from actors.config import load_config
from actors.records import StepPlan
from actors.rollouts import RolloutMaker
from rollout.types import Completion, Scored

ROOT = Path(__file__).resolve().parents[2]
N = 4  # samples per prompt
PROMPTS = [{"prompt": f"p{k}"} for k in range(12)]


def reward_of(k: int, j: int) -> float:
    """Prompt k's sample j: k % 3 == 0 all wrong, k % 3 == 1 all right, k % 3 == 2 right on sample 0 only."""
    return {0: 0.0, 1: 1.0, 2: float(j == 0)}[k % 3]


class _Call:
    def __init__(self, fn):
        self.remote = fn


class _Group:
    """An actor group of one stand-in actor: ``map`` calls it in this process."""

    def __init__(self, **methods):
        self.actor = type("Actor", (), {k: _Call(v) for k, v in methods.items()})

    def __len__(self) -> int:
        return 1

    def map(self, call, shards, on_pending=None, **_):
        return [call(self.actor, shard) for shard in shards]


def _generate(prompts, spec):
    """Sample j of prompt "pk" answers "k:j" in 3 + j tokens (lengths differ within a group); the seed picks nothing
    here, the maker's choice of prompts is what is tested."""
    out = []
    for i, ids in enumerate(prompts):
        k = ids[0]
        out += [Completion(i, [7] * (3 + j), [-0.1] * (3 + j), f"{k}:{j}", "stop") for j in range(spec.n)]
    return out, 0.0


def _score(prompts, responses, rows):
    scored = []
    for text in responses:
        k, j = map(int, text.split(":"))
        scored.append(Scored(reward_of(k, j), {"exact_match": reward_of(k, j)}))
    return scored, 0.0


class _Metrics:
    class _Label:
        def set(self, _):
            pass

        def inc(self, _=1):
            pass

        def labels(self, *_):
            return self

    queue = reward_failures = _Label()


def _maker(*overrides: str) -> RolloutMaker:
    cfg = load_config(ROOT / "configs/grpo.yaml", [f"rollout.n={N}", "algo.prompts_per_step=3", *overrides])
    return RolloutMaker(cfg, PROMPTS, [[k] for k in range(len(PROMPTS))], _Group(generate=_generate),
                        _Group(score=_score), _Metrics(), threading.Event(), lambda: 5)


def _groups(rollouts) -> list[int]:
    """The prompt (k) of each group of the rollouts, in order."""
    return [rollouts.rows[g * N][0][0] for g in range(len(rollouts.rows) // N)]


def test_without_dynamic_sampling_every_group_stays():
    r = _maker()(StepPlan(step=0, prompt_ids=[0, 1, 2], expert_ids=[], mu=0.0))
    assert _groups(r) == [0, 1, 2] and (r.filtered, r.rounds, r.version) == (0, 1, 5)
    # 4 wrong, 4 right, 1 right of 4: 5 / 12
    assert r.reward_mean == pytest.approx(5 / 12) and r.reward_components == {"exact_match": pytest.approx(5 / 12)}


def test_dynamic_sampling_keeps_whole_groups_with_a_spread_and_refills_them():
    maker = _maker("algo.dynamic_sampling=true", "algo.max_sample_rounds=5")
    r = maker(StepPlan(step=3, prompt_ids=[0, 1, 2], expert_ids=[], mu=0.0))
    groups = _groups(r)
    # 3 groups, each a prompt with k % 3 == 2 (the only ones with a spread), each whole and contiguous, none twice
    assert len(groups) == 3 and all(k % 3 == 2 for k in groups) and len(set(groups)) == 3
    assert groups[0] == 2  # the planned prompt's group comes first
    for g, k in enumerate(groups):
        assert [c.text for _, c in r.rows[g * N:(g + 1) * N]] == [f"{k}:{j}" for j in range(N)]
    assert [s.total for s in r.scored] == [reward_of(k, j) for k in groups for j in range(N)]
    # the planned round left 2 uniform groups, and each refill round up to 3 prompts, 1 in 3 of them with a spread
    assert r.rounds > 1 and r.filtered >= 2
    # reward_mean is over every sampled row, the filtered groups' included: each kept group scores 1/4, the filtered
    # ones 0 or 1
    sampled = [reward_of(k, j) for k in groups for j in range(N)]
    assert sum(sampled) / len(sampled) == 0.25 and r.reward_mean != pytest.approx(0.25)
    # the same (seed, step) draws the same refills; another step draws others
    again = _maker("algo.dynamic_sampling=true", "algo.max_sample_rounds=5")(
        StepPlan(step=3, prompt_ids=[0, 1, 2], expert_ids=[], mu=0.0))
    assert _groups(again) == groups and again.filtered == r.filtered
    other = _maker("algo.dynamic_sampling=true", "algo.max_sample_rounds=5")(
        StepPlan(step=4, prompt_ids=[0, 1, 2], expert_ids=[], mu=0.0))
    assert _groups(other) != groups or other.rounds != r.rounds


def test_dynamic_sampling_stops_at_its_round_limit():
    r = _maker("algo.dynamic_sampling=true", "algo.max_sample_rounds=1")(
        StepPlan(step=0, prompt_ids=[0, 1, 3], expert_ids=[], mu=0.0))
    assert r.rows == [] and r.rounds == 1 and r.filtered == 3  # every group uniform, no second round allowed
    assert r.reward_mean == pytest.approx(4 / 12)  # the sampled rows still say what the policy scores


def test_the_overlong_penalty_is_a_reward_component_but_not_a_spread():
    # max_new_tokens 10, buffer 8: lengths 3..6 get (2 - L) / 8 = -0.125 .. -0.5, different within every group; an
    # all-wrong group must still count as uniform
    maker = _maker("algo.dynamic_sampling=true", "algo.max_sample_rounds=1", "algo.overlong_buffer=8")
    r = maker(StepPlan(step=0, prompt_ids=[0, 2], expert_ids=[], mu=0.0))
    assert _groups(r) == [2] and r.filtered == 1
    penalty = [(2 - (3 + j)) / 8 for j in range(N)]
    assert [s.components["overlong"] for s in r.scored] == pytest.approx(penalty)
    assert [s.total for s in r.scored] == pytest.approx([reward_of(2, j) + p for j, p in enumerate(penalty)])
    assert r.reward_components["overlong"] == pytest.approx(sum(penalty) / N)  # both groups' rows: the same lengths
