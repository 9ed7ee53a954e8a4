"""learners/advantages.py: GRPO advantages by hand and against a plain Python loop."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from learners.advantages import grpo_advantages

ATOL_F32 = 1e-6  # float32 results


def grpo_loop(rewards: list[float], group_size: int, std_normalize: bool, eps: float = 1e-6) -> list[float]:
    """The formula read off the paper, one group and one sample at a time."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = statistics.mean(group)
        std = statistics.stdev(group) if len(group) > 1 else 0.0  # unbiased, as torch.std
        for r in group:
            out.append((r - mean) / (std + eps) if std_normalize and group_size > 1 else r - mean)
    return out


def test_grpo_advantages_by_hand():
    # group 0: r = [1, 0, 0, 0]: mean = 0.25, centred = [0.75, -0.25, -0.25, -0.25]
    #          unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = sqrt(0.25) = 0.5
    #          A = centred / (0.5 + 1e-6) = [1.4999970, -0.4999990, -0.4999990, -0.4999990]
    # group 1: r = [2, 2, 2, 2]: centred = 0 -> A = 0 (no NaN from the zero std)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(rewards, 4)
    s = 0.5 + 1e-6
    expected = torch.tensor([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s, 0.0, 0.0, 0.0, 0.0])
    assert adv.shape == (8,)
    torch.testing.assert_close(adv, expected, atol=ATOL_F32, rtol=0)


def test_grpo_advantages_without_std_by_hand():
    # Dr. GRPO: A = r - mean only: group 0 -> [0.75, -0.25, -0.25, -0.25]; group 1 ([3, 1]) -> mean 2 -> [1, -1]
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 3.0, 1.0]), 4, std_normalize=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 1.0, -1.0]),
                               atol=ATOL_F32, rtol=0)


@pytest.mark.parametrize("std_normalize", [True, False])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_grpo_advantages_match_loop(std_normalize, group_size):
    g = torch.Generator().manual_seed(100 * group_size + std_normalize)
    for rewards in (
        torch.rand(5 * group_size, generator=g, dtype=torch.float64) * 4 - 2,  # continuous rewards
        torch.randint(0, 2, (5 * group_size,), generator=g).double(),  # 0/1 rewards (some groups all equal)
    ):
        adv = grpo_advantages(rewards, group_size, std_normalize=std_normalize)
        expected = torch.tensor(grpo_loop(rewards.tolist(), group_size, std_normalize), dtype=torch.float32)
        torch.testing.assert_close(adv, expected, atol=ATOL_F32, rtol=0)
        # per group the advantages sum to 0
        assert adv.view(-1, group_size).sum(1).abs().max() < 1e-5


def test_grpo_advantages_group_of_one_is_zero():
    adv = grpo_advantages(torch.tensor([0.3, 1.0, -2.0]), 1)
    assert torch.equal(adv, torch.zeros(3)) and not adv.isnan().any()


def test_grpo_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), 4)


def test_grpo_loop_reference_is_right():
    # the reference itself, by hand: [0, 2]: mean 1, stdev sqrt(2) -> [-1 / (1.4142136 + 1e-6), +...]
    a = grpo_loop([0.0, 2.0], 2, True)
    assert math.isclose(a[1], 1.0 / (math.sqrt(2.0) + 1e-6), abs_tol=1e-12) and math.isclose(a[0], -a[1])
