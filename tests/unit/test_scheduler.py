"""actors/scheduler.py: the mu schedule, the expert row count, the step plan and the groups a failed reward drops."""

from __future__ import annotations

import math

import pytest

from actors.config import AlgoConfig
from actors.scheduler import Scheduler, drop_failed_groups, num_expert_rows, uniform_groups
from learners.schedules import MU_SCHEDULES, mu_at, mu_linear
from rollout.types import Scored


def test_mu_at_by_hand():
    # W = 4 warmup steps to mu_peak = 0.5, then D = 2 cosine steps down to mu_valley = 0.1
    kw = dict(mu_peak=0.5, mu_valley=0.1, warmup_steps=4, decay_steps=2)
    # warmup: mu = 0.5 * step / 4 -> 0, 0.125, 0.25, 0.375
    for step, mu in [(0, 0.0), (1, 0.125), (2, 0.25), (3, 0.375)]:
        assert math.isclose(mu_at(step, **kw), mu, abs_tol=1e-12)
    # step 4: s = 0, cos(0) = 1  -> 0.1 + 0.4 * (1 + 1) / 2 = 0.5 (the peak)
    assert math.isclose(mu_at(4, **kw), 0.5, abs_tol=1e-12)
    # step 5: s = 1, cos(pi / 2) = 0 -> 0.1 + 0.4 * (1 + 0) / 2 = 0.3
    assert math.isclose(mu_at(5, **kw), 0.3, abs_tol=1e-12)
    # step >= W + D = 6: the valley
    assert mu_at(6, **kw) == 0.1 and mu_at(1000, **kw) == 0.1


def test_mu_at_constant_without_schedule():
    assert [mu_at(s, mu_peak=0.9, mu_valley=0.3, warmup_steps=0, decay_steps=0) for s in (0, 1, 50)] == [0.3] * 3


def test_mu_at_decay_is_monotone():
    kw = dict(mu_peak=1.0, mu_valley=0.2, warmup_steps=0, decay_steps=300)
    mus = [mu_at(s, **kw) for s in range(310)]
    assert mus[0] == 1.0  # exactly 1: the first step is pure SFT (no rollouts)
    assert all(a >= b for a, b in zip(mus, mus[1:]))
    # step 150 = half way: 0.2 + 0.8 * (1 + cos(pi / 2)) / 2 = 0.6
    assert math.isclose(mus[150], 0.6, abs_tol=1e-12)


def test_num_expert_rows_by_hand():
    # E = round(r * n / (1 - r)):  r = 0.5, n = 64 -> 64 (half the rows); r = 0.2 -> 16 / 80 = 0.2; r = 0 -> 0
    assert num_expert_rows(64, 0.5) == 64
    assert num_expert_rows(64, 0.2) == 16
    assert num_expert_rows(64, 0.0) == 0
    # r = 0.25, n = 10: 0.25 * 10 / 0.75 = 3.33 -> 3 (3 / 13 = 0.231; 4 / 14 = 0.286 is further from 0.25)
    assert num_expert_rows(10, 0.25) == 3


@pytest.mark.parametrize("n", [1, 7, 64, 96])
def test_num_expert_rows_within_half_a_row(n):
    for k in range(0, 100, 3):
        r = k / 100
        exact = r * n / (1 - r)  # the real-valued E with E / (E + n) = r
        assert abs(num_expert_rows(n, r) - exact) <= 0.5 + 1e-9


def _scheduler(**algo) -> Scheduler:
    # 4 prompts x group 2 = 8 on-policy rows; expert_ratio 0.5 -> 8 expert rows
    cfg = AlgoConfig(prompts_per_step=4, expert_ratio=0.5, **algo)
    return Scheduler(cfg, group_size=2, num_prompts=10, num_expert=12, seed=3)


def test_plan_mu_one_has_no_prompts_and_mu_zero_no_expert_rows():
    # mu: step 0 = 1.0 (pure SFT), step 1 = 0.5, step >= 2 = 0.0 (pure RL)
    s = _scheduler(mu_peak=1.0, mu_valley=0.0, mu_warmup_steps=0, mu_decay_steps=2)
    p0, p1, p2 = s.plan(0), s.plan(1), s.plan(2)
    assert (p0.mu, p1.mu, p2.mu) == (1.0, 0.5, 0.0)
    assert p0.prompt_ids == [] and len(p0.expert_ids) == 8
    assert len(p1.prompt_ids) == 4 and len(p1.expert_ids) == 8
    assert len(p2.prompt_ids) == 4 and p2.expert_ids == []
    assert all(0 <= i < 10 for i in p1.prompt_ids + p2.prompt_ids)
    assert all(0 <= i < 12 for i in p0.expert_ids + p1.expert_ids)
    assert p1.step == 1


def test_plan_skipped_side_does_not_consume_its_cursor():
    # The mu = 1 step draws no prompts, so step 1 gets the very first prompts a fresh cursor would give.
    a = _scheduler(mu_peak=1.0, mu_valley=0.0, mu_warmup_steps=0, mu_decay_steps=2)
    b = _scheduler(mu_peak=1.0, mu_valley=0.0, mu_warmup_steps=0, mu_decay_steps=2)
    a.plan(0)
    assert a.plan(1).prompt_ids == b.prompts.take(4)


def test_plan_without_expert_data_has_no_expert_rows():
    cfg = AlgoConfig(prompts_per_step=4, expert_ratio=0.5, mu_peak=0.5, mu_valley=0.5)
    s = Scheduler(cfg, group_size=2, num_prompts=10, num_expert=0, seed=0)
    plan = s.plan(0)
    assert plan.mu == 0.5 and plan.expert_ids == [] and len(plan.prompt_ids) == 4


def test_plan_walks_prompts_as_epochs():
    # 10 prompts, 4 per step (mu constant 0.2): steps 0..4 take 20 ids = two whole permutations of 0..9
    s = _scheduler(mu_peak=0.2, mu_valley=0.2)
    ids = [i for step in range(5) for i in s.plan(step).prompt_ids]
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))


def _scored(failed: list[list[str]]) -> list[Scored]:
    return [Scored(total=float(i), failed=f) for i, f in enumerate(failed)]


def test_drop_failed_groups_by_hand():
    # G = 3, four groups: rows 0-2, 3-5, 6-8, 9-11
    ok, bad = [], ["r"]
    scored = _scored([ok, ok, ok,         # group 0: kept
                      ok, bad, ok,        # group 1: one failed row -> dropped whole
                      ok, ok, ok,         # group 2: kept
                      bad, ["r", "s"], bad])  # group 3: all failed -> dropped
    kept, dropped = drop_failed_groups(scored, 3)
    assert dropped == [1, 3]
    assert kept == [0, 1, 2, 6, 7, 8]  # groups 0 and 2, still contiguous, 3 each
    assert [scored[i].total for i in kept] == [0.0, 1.0, 2.0, 6.0, 7.0, 8.0]  # the rows themselves, in order


def test_drop_failed_groups_edge_cases():
    assert drop_failed_groups(_scored([[]] * 4), 2) == ([0, 1, 2, 3], [])  # nothing failed: nothing dropped
    assert drop_failed_groups(_scored([["r"]] + [[]] * 3), 2) == ([2, 3], [0])  # first row of the first group
    assert drop_failed_groups(_scored([[]] * 3 + [["r"]]), 2) == ([0, 1], [1])  # last row of the last group
    assert drop_failed_groups(_scored([["r"], [], [], ["r"]]), 2) == ([], [0, 1])  # every group: none left
    assert drop_failed_groups([], 4) == ([], [])
    with pytest.raises(ValueError, match="groups of 3"):
        drop_failed_groups(_scored([[]] * 4), 3)


def test_mu_linear_by_hand():
    # W = 2 warmup, H = 1 hold at 0.5, then D = 4 straight down to 0.1: 0.4 / 4 = 0.1 a step
    kw = dict(mu_peak=0.5, mu_valley=0.1, warmup_steps=2, hold_steps=1, decay_steps=4)
    expected = [0.0, 0.25, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1]  # steps 0..8: warmup, hold, decay (s = 0..3), valley
    for step, mu in enumerate(expected):
        assert math.isclose(mu_linear(step, **kw), mu, abs_tol=1e-12), step


def test_scheduler_takes_mu_from_the_configured_schedule():
    assert MU_SCHEDULES.names() == ("cosine", "linear")
    # step 5 of a 0.5 -> 0.1 decay over 4 steps starting at step 3: cosine 0.1 + 0.4 * (1 + cos(pi / 2)) / 2 = 0.3,
    # linear 0.5 - 0.4 * 2 / 4 = 0.3 too, so look at step 4 (s = 1): cosine 0.1 + 0.2 * (1 + cos(pi / 4)) = 0.4414214,
    # linear 0.4
    base = dict(mu_peak=0.5, mu_valley=0.1, mu_warmup_steps=2, mu_hold_steps=1, mu_decay_steps=4)
    cos = Scheduler(AlgoConfig(**base, mu_schedule="cosine"), 4, 10, 10, 0)
    lin = Scheduler(AlgoConfig(**base, mu_schedule="linear"), 4, 10, 10, 0)
    assert math.isclose(cos.mu(4), 0.1 + 0.2 * (1 + math.cos(math.pi / 4)), abs_tol=1e-12)
    assert math.isclose(lin.mu(4), 0.4, abs_tol=1e-12)


def test_uniform_groups_are_those_with_one_reward():
    # groups of 3: [1, 1, 1] all right, [0, 1, 0] spread, [0, 0, 0] all wrong, [0.5, 0.5, 0.25] spread
    totals = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.25]
    assert uniform_groups([Scored(t) for t in totals], 3) == [0, 2]
    assert uniform_groups([Scored(1.0)] * 2, 1) == [0, 1]  # a group of one is always uniform (refused in config)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        uniform_groups([Scored(0.0)] * 4, 3)
