"""learners/advantages.py: GRPO advantages and GAE by hand and against plain Python loops; whitening."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from learners.advantages import final_token_rewards, gae, grpo_advantages, whiten

ATOL_F32 = 1e-6  # float32 results
ATOL = 1e-9  # float64 inputs: hand arithmetic must match to rounding
F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


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


# --- gae --------------------------------------------------------------------------------------------------------


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE over one row's tokens (no padding), read off the paper: one token at a time from the end."""
    out = [0.0] * len(rewards)
    next_value, next_adv = 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        out[t], next_value = next_adv, values[t]
    return out


def test_gae_gamma_one_lambda_one_by_hand():
    # gamma = lam = 1: A_t = sum_{k >= t} r_k - V_t, R_t = A_t + V_t = the reward to go
    #   row 0, 3 tokens: r = [0, 0, 1], V = [0.2, 0.5, 0.7] -> A = [0.8, 0.5, 0.3], R = [1, 1, 1]
    #   row 1, 2 tokens: r = [0, 2], V = [0.1, 0.4], then padding holding 99 (must not count)
    #                    -> A = [1.9, 1.6, 0], R = [2, 2, 0]
    rewards = t64([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = t64([[0.2, 0.5, 0.7], [0.1, 0.4, 99.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t64([[0.8, 0.5, 0.3], [1.9, 1.6, 0.0]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(ret, t64([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]), atol=ATOL, rtol=0)


def test_gae_discounted_by_hand():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); r = [0, 0.5, 1], V = [0.2, 0.4, 0.6]; V after the last token = 0
    #   t = 2: delta_2 = 1.0 + 0.9 * 0   - 0.6 = 0.4               A_2 = 0.4
    #   t = 1: delta_1 = 0.5 + 0.9 * 0.6 - 0.4 = 0.64              A_1 = 0.64 + 0.72 * 0.4   = 0.928
    #   t = 0: delta_0 = 0.0 + 0.9 * 0.4 - 0.2 = 0.16              A_0 = 0.16 + 0.72 * 0.928 = 0.82816
    #   R = A + V = [1.02816, 1.328, 1.0]
    rewards, values = [0.0, 0.5, 1.0], [0.2, 0.4, 0.6]
    adv, ret = gae(t64([rewards]), t64([values]), torch.ones(1, 3, dtype=F64), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t64([[0.82816, 0.928, 0.4]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(ret, t64([[1.02816, 1.328, 1.0]]), atol=ATOL, rtol=0)
    # the loop reference agrees with the hand arithmetic
    assert all(math.isclose(a, b, abs_tol=ATOL) for a, b in zip(gae_loop(rewards, values, 0.9, 0.8),
                                                               [0.82816, 0.928, 0.4]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_loop_on_ragged_rows(gamma, lam):
    g = torch.Generator().manual_seed(int(100 * gamma + 10 * lam))
    B, T = 6, 7
    lengths = [7, 3, 0, 1, 5, 6]  # a full row, an empty one, a single token
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)  # padding positions hold values too: they must not count
    mask = torch.zeros(B, T, dtype=F64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.zeros(B, T, dtype=F64)
    for b, n in enumerate(lengths):
        expected[b, :n] = t64(gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam))
    torch.testing.assert_close(adv, expected, atol=ATOL, rtol=0)
    # returns = advantages + values on counted tokens, 0 outside (so are the advantages)
    torch.testing.assert_close(ret, (expected + values) * mask, atol=ATOL, rtol=0)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    assert (ret[mask == 1] != 0).all()  # the comparison is not between zeros


def test_gae_first_token_advantage_is_total_reward_minus_first_value():
    # gamma = lam = 1 with the sequence reward on the last token (as chorus builds it): A_0 = R - V_0 and every
    # token's return is R. Rewards [1.5, -2.0, 3.0], lengths [3, 1, 4], V = [[0.1, ...], [0.7, ...], [-0.4, ...]]:
    #   A_0 = [1.5 - 0.1, -2.0 - 0.7, 3.0 + 0.4] = [1.4, -2.7, 3.4]
    lengths = [3, 1, 4]
    rewards = final_token_rewards(t64([1.5, -2.0, 3.0]), lengths, 4)
    values = t64([[0.1, 0.3, -0.2, 5.0], [0.7, 5.0, 5.0, 5.0], [-0.4, 0.2, 0.9, 0.3]])
    mask = t64([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[:, 0], t64([1.4, -2.7, 3.4]), atol=ATOL, rtol=0)
    torch.testing.assert_close(ret, t64([1.5, -2.0, 3.0])[:, None] * mask, atol=ATOL, rtol=0)


# --- final_token_rewards ----------------------------------------------------------------------------------------


def test_final_token_rewards_on_each_rows_last_token():
    # lengths [3, 1, 0, 4], width 4: row 2 has no tokens and gets nothing
    out = final_token_rewards(t64([1.5, -2.0, 3.0, 0.7]), [3, 1, 0, 4], 4)
    assert out.dtype == F64
    assert torch.equal(out, t64([[0.0, 0.0, 1.5, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                                 [0.0, 0.0, 0.0, 0.7]]))


# --- whiten -----------------------------------------------------------------------------------------------------

# x = [1, 2, 4] counted, then a masked 1e30: mean = 7/3 = 2.3333333, deviations [-4/3, -1/3, 5/3],
# squares 16/9 + 1/9 + 25/9 = 42/9, unbiased variance 42/9 / 2 = 7/3, std = sqrt(7/3 + eps 1e-8) = 1.5275252
# whitened: [-0.8728716, -0.2182179, 1.0910895, 0] (the biased std sqrt(14/9) = 1.2472191 would give -1.0690450 first)
_WHITEN_X = [1.0, 2.0, 4.0, 1e30]
_WHITEN_MASK = [1.0, 1.0, 1.0, 0.0]
_WHITENED = [d / math.sqrt(7 / 3 + 1e-8) for d in (-4 / 3, -1 / 3, 5 / 3)]


def test_whiten_by_hand():
    out = whiten(t64(_WHITEN_X), t64(_WHITEN_MASK))
    torch.testing.assert_close(out, t64(_WHITENED + [0.0]), atol=ATOL, rtol=0)
    assert math.isclose(_WHITENED[0], -0.8728716, abs_tol=1e-7)
    # without a mask every position counts: the same numbers on the counted three
    torch.testing.assert_close(whiten(t64(_WHITEN_X[:3])), t64(_WHITENED), atol=ATOL, rtol=0)


def test_whiten_keep_mean():
    # shift_mean=False adds the mean back: [-0.8728716 + 2.3333333, ...] = [1.4604618, 2.1151154, 3.4244228, 0];
    # the counted positions keep mean 7/3 and get unbiased std 1 (up to eps)
    out = whiten(t64(_WHITEN_X), t64(_WHITEN_MASK), shift_mean=False)
    torch.testing.assert_close(out, t64([w + 7 / 3 for w in _WHITENED] + [0.0]), atol=ATOL, rtol=0)
    assert math.isclose(float(out[:3].mean()), 7 / 3, abs_tol=ATOL)
    assert math.isclose(float(out[:3].std()), 1.0, abs_tol=1e-8)


def test_whiten_empty_mask_and_gae_padding_are_finite():
    # nothing to normalise over -> zeros, not 0/0 = nan
    assert whiten(torch.tensor([1.0, 2.0]), torch.zeros(2)).tolist() == [0.0, 0.0]
    # nan / inf at padding positions do not reach the counted ones
    r = t64([[0.0, 1.0, float("nan")]])
    v = t64([[0.5, 0.5, float("inf")]])
    adv, ret = gae(r, v, t64([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    # gamma = lam = 1: A_0 = 1 - 0.5 = 0.5, A_1 = 1 - 0.5 = 0.5
    assert adv.tolist() == [[0.5, 0.5, 0.0]]


# --- the registered estimators ------------------------------------------------------------------------------------

from learners.advantages import ADVANTAGES, AdvantageSpec, needs_critic  # noqa: E402


def test_estimator_registry():
    assert ADVANTAGES.names() == ("grpo", "rloo", "gae")
    assert [needs_critic(n) for n in ADVANTAGES] == [False, False, True]


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    m = torch.zeros(len(lengths), width)
    for b, n in enumerate(lengths):
        m[b, :n] = 1.0
    return m


def test_grpo_estimator_is_grpo_advantages_on_every_token():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 1.0])
    mask = _mask([1, 3, 2, 4, 4, 1, 2, 3], 4)
    spec = AdvantageSpec(group_size=4)
    adv, returns = ADVANTAGES["grpo"](rewards, mask, spec)
    assert returns is None
    torch.testing.assert_close(adv, grpo_advantages(rewards, 4)[:, None] * mask, atol=0, rtol=0)


def test_token_rewards_add_to_the_sequence_reward():
    # kl_penalty: reward puts -coef * kl on each token; GRPO sees each row's score plus the sum of its tokens':
    #   rows [1, 0] with token rewards [[-0.1, -0.2], [-0.3, 0 (padding, not counted: 5.0)]] -> [0.7, -0.3];
    #   Dr. GRPO (no std): mean 0.2 -> [0.5, -0.5]
    rewards = torch.tensor([1.0, 0.0])
    mask = _mask([2, 1], 2)
    token_rewards = torch.tensor([[-0.1, -0.2], [-0.3, 5.0]])
    adv, _ = ADVANTAGES["grpo"](rewards, mask, AdvantageSpec(group_size=2, std_normalize=False),
                                token_rewards=token_rewards)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5], [-0.5, 0.0]]), atol=1e-6, rtol=0)


def test_rloo_by_hand():
    # group 0: r = [1, 0, 0.5]: baselines (others' mean) [0.25, 0.75, 0.5] -> A = [0.75, -0.75, 0]
    # group 1: r = [2, 2, 2]: A = 0
    rewards = t64([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    adv, returns = ADVANTAGES["rloo"](rewards, torch.ones(6, 1, dtype=F64), AdvantageSpec(group_size=3))
    assert returns is None
    torch.testing.assert_close(adv[:, 0], t64([0.75, -0.75, 0.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0, check_dtype=False)


def test_rloo_matches_a_loop():
    g = torch.Generator().manual_seed(5)
    G, N = 5, 4
    rewards = torch.rand(N * G, generator=g, dtype=F64)
    adv, _ = ADVANTAGES["rloo"](rewards, torch.ones(N * G, 1, dtype=F64), AdvantageSpec(group_size=G))
    for i in range(N * G):
        start = i // G * G
        others = [float(rewards[j]) for j in range(start, start + G) if j != i]
        assert math.isclose(float(adv[i, 0]), float(rewards[i]) - sum(others) / (G - 1), abs_tol=1e-6)
    with pytest.raises(ValueError, match="rloo needs at least 2 samples"):
        ADVANTAGES["rloo"](rewards, torch.ones(N * G, 1), AdvantageSpec(group_size=1))


def test_gae_estimator_is_gae_on_final_token_rewards():
    lengths = [3, 1, 2]
    mask = _mask(lengths, 3)
    rewards = torch.tensor([1.0, -0.5, 0.25])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0], [-0.2, 0.4, 9.0]])
    spec = AdvantageSpec(group_size=1, gamma=0.9, lam=0.8, whiten_advantages=False)
    adv, returns = ADVANTAGES["gae"](rewards, mask, spec, values=values)
    want_adv, want_returns = gae(final_token_rewards(rewards, lengths, 3), values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, want_adv, atol=0, rtol=0)
    torch.testing.assert_close(returns, want_returns, atol=0, rtol=0)
    # whitened as the driver did: over the step's tokens; rewards whitened over the step's rows first
    spec = AdvantageSpec(group_size=1, gamma=0.9, lam=0.8, whiten_rewards=True, whiten_advantages=True)
    adv, _ = ADVANTAGES["gae"](rewards, mask, spec, values=values)
    raw, _ = gae(final_token_rewards(whiten(rewards), lengths, 3), values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, whiten(raw, mask), atol=0, rtol=0)


def test_overlong_penalty_by_hand():
    from learners.advantages import overlong_penalty

    # L_max = 16, L_cache = 4: no penalty up to 12 tokens, then (12 - |y|) / 4: 13 -> -0.25, 14 -> -0.5, 16 -> -1;
    # beyond the budget -1; factor 0.5 halves it
    lengths = torch.tensor([3, 12, 13, 14, 16, 20])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=16, buffer=4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]), atol=0, rtol=0)
    torch.testing.assert_close(overlong_penalty(lengths, max_len=16, buffer=4, factor=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]), atol=0, rtol=0)
