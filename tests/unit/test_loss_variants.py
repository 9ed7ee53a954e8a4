"""The registered variants of learners/losses.py beyond plain PPO: clip-higher, the dual clip's share, GSPO, the
engine/learner importance-sampling corrections and their metrics, Dr. GRPO's aggregation, the SFT token weights and
the expected gradient of each KL estimator. Expected values by hand (arithmetic in the comments), vectorised code
against naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from learners.losses import (
    AGGREGATIONS,
    IS_CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    SFT_WEIGHTS,
    LossSpec,
    chord_loss,
    kl_reward,
    ref_log_ratio,
    rl_loss,
    sft_loss,
)

F64 = torch.float64
ATOL = 1e-9


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def close(a, expected: float, atol: float = ATOL) -> None:
    value = float(a.detach()) if isinstance(a, torch.Tensor) else float(a)
    assert abs(value - expected) <= atol, f"{value!r} != {expected!r}"


def test_registries_hold_the_documented_names():
    assert POLICY_LOSSES.names() == ("ppo", "gspo")
    assert AGGREGATIONS.names() == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                    "seq-mean-token-sum-norm")
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert IS_CORRECTIONS.names() == ("none", "token-truncate", "token-mask", "seq-truncate", "seq-mask")
    assert SFT_WEIGHTS.names() == ("nll", "phi")
    for field, bad in (("policy_loss", "grpo"), ("sft_weight", "tis"), ("is_correction", "tis")):
        with pytest.raises(ValueError, match=f"LossSpec.{field}: unknown .* '{bad}'; expected one of"):
            LossSpec(**{field: bad})


# --- clip-higher and the dual clip's share -------------------------------------------------------------------------


def _one_token(x: float, a: float, spec: LossSpec):
    """Loss, gradient and metrics of one token with log ratio x and advantage a."""
    logprobs = t64([[x - 1.0]]).requires_grad_(True)
    loss, metrics = rl_loss(logprobs, t64([[-1.0]]), t64([a]), t64([[1.0]]), spec)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return float(loss.detach()), float(grad), metrics


def test_clip_higher_widens_the_upper_side_only():
    sym, dapo = LossSpec(clip_low=0.2, clip_high=0.2), LossSpec(clip_low=0.2, clip_high=0.28)
    # A = +1, x = 0.2: ratio = exp(0.2) = 1.2214028
    #   symmetric: clipped to 1.2 -> loss max(-1.2214028, -1.2) = -1.2, gradient 0, clipped
    loss, grad, m = _one_token(0.2, 1.0, sym)
    close(loss, -1.2), close(grad, 0.0), close(m["clip_frac"], 1.0)
    #   clip-higher: 1.2214028 < 1.28, inside -> loss -1.2214028, gradient -ratio = -1.2214028, not clipped
    loss, grad, m = _one_token(0.2, 1.0, dapo)
    close(loss, -math.exp(0.2)), close(grad, -math.exp(0.2)), close(m["clip_frac"], 0.0)
    # A = +1, x = 0.3: ratio = 1.3498588 > 1.28 -> clipped to 1.28 even with clip-higher
    close(_one_token(0.3, 1.0, dapo)[0], -1.28)
    # A = -1, x = -0.3: ratio = 0.7408182 < 0.8: max(0.7408182, 0.8) = 0.8 on both specs (the lower side is shared)
    for spec in (sym, dapo):
        loss, grad, m = _one_token(-0.3, -1.0, spec)
        close(loss, 0.8), close(grad, 0.0), close(m["clip_frac"], 1.0)


def test_dual_clip_share_is_reported_apart_from_clip_frac():
    # clip 0.2, dual clip c = 3, three tokens (log ratio x, advantage A):
    #   A = -1, x = 2:   ratio 7.3890561: pg1 = 7.3890561 > pg2 = 1.2 (not clipped), then min(7.389, 3) = 3: dual
    #   A = -1, x = 0.5: ratio 1.6487213: pg1 = 1.6487213 > 1.2, below 3: neither
    #   A = +1, x = 0.5: pg1 = -1.6487213 < pg2 = -1.2: clipped
    # clip_frac = 1/3, dual_clip_frac = 1/3; loss = (3 + 1.6487213 - 1.2) / 3 = 1.1495738
    x = t64([[2.0, 0.5, 0.5]])
    logprobs = (x - 1.0).requires_grad_(True)
    old = torch.full_like(x, -1.0)
    adv = t64([[-1.0, -1.0, 1.0]])
    loss, m = rl_loss(logprobs, old, adv, torch.ones_like(x), LossSpec(dual_clip=3.0))
    close(loss, (3.0 + math.exp(0.5) - 1.2) / 3)
    close(m["clip_frac"], 1 / 3), close(m["dual_clip_frac"], 1 / 3)
    # both gradients vanish where a clip binds: [0 (dual), -A * ratio / 3 = 1.6487213 / 3, 0 (clipped)]
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t64([[0.0, math.exp(0.5) / 3, 0.0]]), atol=ATOL, rtol=0)
    # without a dual clip the share is 0
    close(rl_loss(logprobs, old, adv, torch.ones_like(x), LossSpec())[1]["dual_clip_frac"], 0.0)


# --- GSPO ------------------------------------------------------------------------------------------------------------


def _gspo_inputs():
    # row 0: A = +1, log ratios [0.1, 0.3, 5.0 (masked)]   -> mean 0.2, s = exp(0.2) = 1.2214028
    # row 1: A = -2, log ratios [-0.2, -0.4, 0.0]          -> mean -0.2, s = exp(-0.2) = 0.8187308
    old = t64([[-1.0, -2.0, -0.5], [-1.5, -0.3, -0.9]])
    logprobs = (old + t64([[0.1, 0.3, 5.0], [-0.2, -0.4, 0.0]])).requires_grad_(True)
    return logprobs, old, t64([1.0, -2.0]), t64([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_gspo_by_hand():
    logprobs, old, adv, mask = _gspo_inputs()
    spec = LossSpec(policy_loss="gspo", clip_low=0.2, clip_high=0.28, agg="seq-mean-token-mean")
    loss, m = rl_loss(logprobs, old, adv, mask, spec)
    # both sequence ratios inside [0.8, 1.28]: per-sequence loss -A * s
    #   row 0: -1.2214028;  row 1: 2 * 0.8187308 = 1.6374615;  mean over 2 sequences = 0.2080294
    close(loss, (-math.exp(0.2) + 2 * math.exp(-0.2)) / 2)
    close(loss, 0.2080294, atol=1e-7)
    # every token carries its sequence's ratio: (2 * 1.2214028 + 3 * 0.8187308) / 5 tokens = 0.9798001
    close(m["ratio"], (2 * math.exp(0.2) + 3 * math.exp(-0.2)) / 5)
    close(m["clip_frac"], 0.0)
    # gradient: -A * s / T_b / N_seqs on each counted token:
    #   row 0: -1.2214028 / 2 / 2 = -0.3053507;  row 1: 2 * 0.8187308 / 3 / 2 = 0.2729103
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = t64([[-math.exp(0.2) / 4] * 2 + [0.0], [2 * math.exp(-0.2) / 6] * 3])
    torch.testing.assert_close(grad, expected, atol=ATOL, rtol=0)
    # symmetric clip 0.2: row 0's ratio 1.2214028 > 1.2 is clipped whole (both its tokens), row 1 is not
    loss, m = rl_loss(logprobs, old, adv, mask, LossSpec(policy_loss="gspo", agg="seq-mean-token-mean"))
    close(loss, (-1.2 + 2 * math.exp(-0.2)) / 2)
    close(m["clip_frac"], 2 / 5)


def test_gspo_matches_the_sequence_level_objective_computed_directly():
    """GSPO's eq. 5 written at sequence level with autograd: the same loss and gradient as the token form."""
    g = torch.Generator().manual_seed(3)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logprobs = (old + (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 0.6).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        mask[b, : 1 + b % T] = 1.0
    spec = LossSpec(policy_loss="gspo", clip_low=0.1, clip_high=0.15, agg="seq-mean-token-mean")
    loss, _ = rl_loss(logprobs, old, adv, mask, spec)
    (grad,) = torch.autograd.grad(loss, logprobs)

    direct = 0.0
    for b in range(B):
        n = int(mask[b].sum())
        s = torch.exp((logprobs[b, :n] - old[b, :n]).sum() / n)
        direct = direct + torch.maximum(-adv[b] * s, -adv[b] * torch.clamp(s, 0.9, 1.15))
    direct = direct / B
    (direct_grad,) = torch.autograd.grad(direct, logprobs)
    close(loss, float(direct.detach()), atol=1e-12)
    torch.testing.assert_close(grad, direct_grad, atol=1e-12, rtol=0)
    assert (grad != 0).any() and (grad == 0).sum() > (mask == 0).sum()  # some sequences are clipped, some not


# --- importance-sampling corrections of the engine/learner mismatch ---------------------------------------------

# log rho = old_logprobs (proximal, learner) - behaviour_logprobs (engine); cap C = 2 (log 2 = 0.6931472):
#   row 0: [0.1, 1.0, -1.0]     rho = [1.1051709, 2.7182818, 0.3678794]   sum 0.1  -> rho_b = 1.1051709
#   row 1: [0.5, -0.8, 9 (masked)]  rho = [1.6487213, 0.4493290]            sum -0.3 -> rho_b = 0.7408182
#   row 2: [0.4, 0.4, 0 (masked)]   rho = [1.4918247, 1.4918247]            sum 0.8  -> rho_b = 2.2255409
_LOG_RHO = [[0.1, 1.0, -1.0], [0.5, -0.8, 9.0], [0.4, 0.4, 0.0]]
_IS_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
e = math.exp
_EXPECTED_WEIGHTS = {
    "none": [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]],
    # min(rho_t, 2)
    "token-truncate": [[e(0.1), 2.0, e(-1.0)], [e(0.5), e(-0.8), 0.0], [e(0.4), e(0.4), 0.0]],
    # rho_t inside [0.5, 2], else 0: 2.7182818 and 0.3678794 and 0.4493290 leave
    "token-mask": [[e(0.1), 0.0, 0.0], [e(0.5), 0.0, 0.0], [e(0.4), e(0.4), 0.0]],
    # min(rho_b, 2) on every token of the row
    "seq-truncate": [[e(0.1)] * 3, [e(-0.3)] * 2 + [0.0], [2.0, 2.0, 0.0]],
    # rho_b inside [0.5, 2], else the row leaves
    "seq-mask": [[e(0.1)] * 3, [e(-0.3)] * 2 + [0.0], [0.0, 0.0, 0.0]],
}


def _is_inputs():
    old = t64([[-1.0, -2.0, -0.5], [-1.5, -0.3, -0.9], [-0.2, -0.7, -1.1]])
    return old, old - t64(_LOG_RHO), t64(_IS_MASK)


@pytest.mark.parametrize("name", list(_EXPECTED_WEIGHTS))
def test_is_correction_weights_by_hand(name):
    old, behaviour, mask = _is_inputs()
    w = IS_CORRECTIONS[name](old, behaviour, mask, cap=2.0)
    torch.testing.assert_close(w * mask, t64(_EXPECTED_WEIGHTS[name]), atol=ATOL, rtol=0)
    assert not w.requires_grad


@pytest.mark.parametrize("name", [n for n in IS_CORRECTIONS if n != "none"])
def test_is_correction_weights_match_a_naive_loop(name):
    g = torch.Generator().manual_seed(11)
    B, T, cap = 5, 7, 1.5
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    behaviour = old - (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 1.2
    mask = (torch.rand(B, T, generator=g) > 0.3).to(F64)
    w = IS_CORRECTIONS[name](old, behaviour, mask, cap=cap)
    level, mode = name.split("-")
    for b in range(B):
        seq = sum(float(old[b, t] - behaviour[b, t]) for t in range(T) if mask[b, t])
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = math.exp(float(old[b, t] - behaviour[b, t]) if level == "token" else seq)
            want = min(rho, cap) if mode == "truncate" else (rho if 1 / cap <= rho <= cap else 0.0)
            close(w[b, t], want, atol=1e-12)


def test_is_correction_in_the_loss_and_its_metrics_by_hand():
    # Current = proximal (ratio 1, nothing clipped), advantages [1, -1, 2]: pg_loss_t = -A_b * w_t, token mean over 7.
    # token-truncate: -(1.1051709 + 2 + 0.3678794) + (1.6487213 + 0.4493290) - 2 * 2 * 1.4918247
    #               = -3.4730503 + 2.0980503 - 5.9672989 = -7.3422989;  / 7 = -1.0488998
    old, behaviour, mask = _is_inputs()
    logprobs = old.clone().requires_grad_(True)
    adv = t64([1.0, -1.0, 2.0])
    spec = LossSpec(is_correction="token-truncate", is_cap=2.0)
    loss, m = rl_loss(logprobs, old, adv, mask, spec, behaviour_logprobs=behaviour)
    pg_sum = -(e(0.1) + 2.0 + e(-1.0)) + (e(0.5) + e(-0.8)) - 2 * 2 * e(0.4)
    close(pg_sum, -7.3422989, atol=1e-7)
    close(loss, pg_sum / 7)
    # gradient -A_b * w_t / 7 (the weight is a constant)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, -adv[:, None] * t64(_EXPECTED_WEIGHTS["token-truncate"]) / 7, atol=ATOL,
                               rtol=0)
    # metrics over the 7 tokens:
    #   is_ratio = (1.1051709 + 2.7182818 + 0.3678794 + 1.6487213 + 0.4493290 + 2 * 1.4918247) / 7 = 9.2730318 / 7
    #   is_weight = (1.1051709 + 2 + 0.3678794 + 1.6487213 + 0.4493290 + 2 * 1.4918247) / 7 = 8.5547500 / 7
    #   mismatch_kl = mean(rho - 1 - log rho):
    #     0.0051709 + 0.7182818 + 0.3678794 + 0.1487213 + 0.2493290 + 2 * 0.0918247 = 1.6730318;  / 7 = 0.2390045
    #   is_ratio_outside: 2.7182818, 0.3678794, 0.4493290 are outside [0.5, 2]: 3 / 7
    #   is_seq_outside: row 2 (rho_b = 2.2255409), 2 tokens: 2 / 7
    rho = [e(x) for row, mrow in zip(_LOG_RHO, _IS_MASK) for x, k in zip(row, mrow) if k]
    close(m["is_ratio"], sum(rho) / 7)
    close(sum(rho), 9.2730318, atol=1e-7)
    close(m["is_weight"], (sum(rho) - e(1.0) + 2.0) / 7)
    close(m["mismatch_kl"], sum(r - 1 - math.log(r) for r in rho) / 7)
    close(m["mismatch_kl"], 1.6730318 / 7, atol=1e-7)
    close(m["is_ratio_outside"], 3 / 7)
    close(m["is_seq_outside"], 2 / 7)
    # without behaviour log-probabilities there is nothing to correct and no mismatch metric
    plain, pm = rl_loss(logprobs, old, adv, mask, spec)
    close(plain, (-3.0 + 2.0 - 4.0) / 7)
    assert "mismatch_kl" not in pm


def test_is_correction_split_sums_to_the_whole():
    """Like every RL term: parts of a batch with the global counts sum to the whole (sequence weights included)."""
    old, behaviour, mask = _is_inputs()
    logprobs = (old + 0.05).requires_grad_(True)
    adv = t64([1.0, -1.0, 2.0])
    for name in IS_CORRECTIONS:
        spec = LossSpec(is_correction=name, agg="seq-mean-token-mean")
        full, fm = rl_loss(logprobs, old, adv, mask, spec, behaviour_logprobs=behaviour)
        parts = [rl_loss(logprobs[s], old[s], adv[s], mask[s], spec, behaviour_logprobs=behaviour[s],
                         n_tokens=mask.sum(), n_seqs=3) for s in (slice(0, 1), slice(1, 3))]
        close(full, sum(float(p[0].detach()) for p in parts), atol=1e-12)
        for k in fm:
            close(fm[k], sum(float(p[1][k]) for p in parts), atol=1e-12)


def test_chord_passes_behaviour_logprobs_to_the_rl_term_only():
    old, behaviour, mask = _is_inputs()
    is_expert = torch.tensor([False, True, False])
    spec = LossSpec(is_correction="token-mask")
    loss, m = chord_loss(old, old, t64([1.0, 0.0, 2.0]), mask, is_expert, spec, mu=0.0, behaviour_logprobs=behaviour)
    # RL rows 0 and 2: weights [1.1051709, 0, 0] and [1.4918247, 1.4918247]; pg = -A * w over 5 RL tokens
    close(loss, -(e(0.1) + 2 * 2 * e(0.4)) / 5)
    close(m["is_ratio_outside"], 2 / 5)  # 2.7182818 and 0.3678794; the expert row's tokens do not count


# --- Dr. GRPO's aggregation --------------------------------------------------------------------------------------


def test_seq_mean_token_sum_norm_divides_by_a_constant_per_sequence():
    # x = [[1, 2, 3 (masked)], [4, 5, 6]]: counted sum 1 + 2 + 4 + 5 + 6 = 18; 2 sequences, L = 16:
    #   18 / (2 * 16) = 0.5625, whatever the rows' lengths; with n_seqs = 8: 18 / 128 = 0.140625
    x = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t64([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    agg = AGGREGATIONS["seq-mean-token-sum-norm"]
    close(agg(x, mask, norm=16.0), 0.5625)
    close(agg(x, mask, n_seqs=8, norm=16.0), 0.140625)
    # a longer response weighs more, not less: its gradient per token is 1 / (N L) = 1 / 32 on every token
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(agg(x, mask, norm=16.0), x)
    torch.testing.assert_close(grad, mask / 32, atol=ATOL, rtol=0)


# --- SFT token weights ----------------------------------------------------------------------------------------------


def test_sft_weights_by_hand():
    # p = [0.5, 0.25]: nll weights [1, 1]; phi = p (1 - p) = [0.25, 0.1875]
    logprobs = t64([[math.log(0.5), math.log(0.25)]]).requires_grad_(True)
    torch.testing.assert_close(SFT_WEIGHTS["nll"](logprobs), t64([[1.0, 1.0]]), atol=0, rtol=0)
    torch.testing.assert_close(SFT_WEIGHTS["phi"](logprobs), t64([[0.25, 0.1875]]), atol=ATOL, rtol=0)
    assert not SFT_WEIGHTS["phi"](logprobs).requires_grad
    # sft_loss with phi: (0.25 log 2 + 0.1875 log 4) / 2 = (0.1732868 + 0.2599302) / 2 = 0.2166085
    loss, _ = sft_loss(logprobs, torch.ones(1, 2, dtype=F64), LossSpec(sft_weight="phi"))
    close(loss, (0.25 * math.log(2.0) + 0.1875 * math.log(4.0)) / 2)


# --- KL estimators: what each regularises as a loss term -----------------------------------------------------------


def _expected_gradient(estimator: str, theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """E_{y ~ p}[grad_theta k(y)] over a whole vocabulary, exactly: each token's estimator value differentiated
    through log p(y) only (the sample is fixed, as in a loss), weighted by p(y) detached."""
    logp = theta.log_softmax(-1)  # [V]
    k = KL_ESTIMATORS[estimator](ref_log_ratio(logp, ref, torch.ones_like(logp)))  # [V]
    (grad,) = torch.autograd.grad((logp.exp().detach() * k).sum(), theta)
    return grad


def test_kl_estimators_expected_gradients():
    # p = softmax(theta), ref fixed, a vocabulary of 4 tokens.
    theta = t64([0.3, -0.2, 1.1, 0.0]).requires_grad_(True)
    ref = t64([0.1, 0.4, 0.3, 0.2]).log()

    def grad_of(kl) -> torch.Tensor:
        (g,) = torch.autograd.grad(kl, theta)
        return g

    p = theta.softmax(-1)
    reverse = grad_of((p * (p.log() - ref)).sum())  # grad KL(p || ref)
    forward = grad_of((ref.exp() * (ref - theta.log_softmax(-1))).sum())  # grad KL(ref || p)
    assert (reverse - forward).abs().max() > 0.05  # the two directions differ here
    # k1: E_p[grad log p] = grad sum p = 0: as a loss it regularises nothing
    torch.testing.assert_close(_expected_gradient("k1", theta, ref), torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)
    # k2 = (log r)^2 / 2: E_p[(log p - log ref) grad log p] = grad KL(p || ref)
    torch.testing.assert_close(_expected_gradient("k2", theta, ref), reverse, atol=1e-12, rtol=0)
    # k3 = r - 1 - log r: E_p[(1 - ref / p) grad log p] = -sum ref grad log p = grad KL(ref || p)
    torch.testing.assert_close(_expected_gradient("k3", theta, ref), forward, atol=1e-12, rtol=0)


def test_kl_k2_by_hand():
    # log r = [-0.5, 1.0, 0 (masked)] -> k2 = [0.125, 0.5, 0]; gradient wrt logprobs: -log r = [0.5, -1.0, 0]
    logprobs = t64([[-1.0, -2.0, -3.0]]).requires_grad_(True)
    k2 = KL_ESTIMATORS["k2"](ref_log_ratio(logprobs, t64([[-1.5, -1.0, -0.2]]), t64([[1.0, 1.0, 0.0]])))
    torch.testing.assert_close(k2.detach(), t64([[0.125, 0.5, 0.0]]), atol=ATOL, rtol=0)
    (grad,) = torch.autograd.grad(k2.sum(), logprobs)
    torch.testing.assert_close(grad, t64([[0.5, -1.0, 0.0]]), atol=ATOL, rtol=0)


def test_kl_reward_by_hand():
    # policy log p = [-1, -2, -3 (masked)], reference [-1.5, -1.0, 0]; k1 = -log r = log p - log ref = [0.5, -1.0]:
    # coef 0.1 -> rewards [-0.05, 0.1, 0]: a token the policy likes more than the reference costs reward
    logprobs, ref, mask = t64([[-1.0, -2.0, -3.0]]), t64([[-1.5, -1.0, 0.0]]), t64([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(kl_reward(logprobs, ref, mask, coef=0.1, estimator="k1"), t64([[-0.05, 0.1, 0.0]]),
                               atol=ATOL, rtol=0)
    # k3 = r - 1 - log r with log r = [-0.5, 1.0]: [0.1065307, 0.7182818] -> [-0.0106531, -0.0718282, 0]
    torch.testing.assert_close(kl_reward(logprobs, ref, mask, coef=0.1, estimator="k3"),
                               t64([[-0.1 * (e(-0.5) - 0.5), -0.1 * (e(1.0) - 2.0), 0.0]]), atol=ATOL, rtol=0)
