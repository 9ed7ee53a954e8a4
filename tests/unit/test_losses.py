"""learners/losses.py: expected values computed by hand (arithmetic in the comments), invariance checks."""

from __future__ import annotations

import math

import pytest
import torch

from learners import losses
from learners.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LossSpec,
    entropy_from_logits,
    ref_log_ratio,
    rl_loss,
    token_logprobs,
    value_loss,
)

LOSS_AGGS = AGGREGATIONS.names()


# The hand arithmetic below is written against these keyword forms; each maps onto the registries and a LossSpec.
def _spec(*, clip_eps: float = 0.2, phi: bool = False, **kw) -> LossSpec:
    return LossSpec(clip_low=clip_eps, clip_high=clip_eps, sft_weight="phi" if phi else "nll", **kw)


def aggregate(x, mask, agg: str = "token-mean", **counts):
    return AGGREGATIONS[agg](x, mask, **counts)


def kl_penalty(logprobs, ref_logprobs, mask, estimator: str = "k3"):
    return KL_ESTIMATORS[estimator](ref_log_ratio(logprobs, ref_logprobs, mask))


def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, behaviour_logprobs=None,
                  n_tokens=None, n_seqs=None, **spec):
    return rl_loss(logprobs, old_logprobs, advantages, mask, _spec(**spec), ref_logprobs=ref_logprobs,
                   behaviour_logprobs=behaviour_logprobs, n_tokens=n_tokens, n_seqs=n_seqs)


def sft_loss(logprobs, mask, *, phi: bool = False, n_tokens=None):
    return losses.sft_loss(logprobs, mask, _spec(phi=phi), n_tokens=n_tokens)


def chord_loss(logprobs, old_logprobs, advantages, mask, is_expert, *, mu, ref_logprobs=None,
               behaviour_logprobs=None, n_rl_tokens=None, n_rl_seqs=None, n_sft_tokens=None, **spec):
    return losses.chord_loss(logprobs, old_logprobs, advantages, mask, is_expert, _spec(**spec), mu=mu,
                             ref_logprobs=ref_logprobs, behaviour_logprobs=behaviour_logprobs,
                             n_rl_tokens=n_rl_tokens, n_rl_seqs=n_rl_seqs, n_sft_tokens=n_sft_tokens)

ATOL_EXACT = 1e-12  # float64 arithmetic, exact up to rounding
ATOL_F32 = 1e-6  # float32 results
ATOL_7DP = 1e-7  # hand arithmetic written to 7 decimals
ATOL = 1e-9  # float64 inputs: hand arithmetic must match to rounding
F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def num(a) -> float:
    return float(a.detach()) if isinstance(a, torch.Tensor) else float(a)


def close(a: torch.Tensor, expected: float, atol: float = ATOL) -> None:
    value = num(a)
    assert abs(value - expected) <= atol, f"{value!r} != {expected!r}"


# --- token_logprobs / entropy_from_logits ---------------------------------------------------------------------


def test_token_logprobs_by_hand():
    # Position 0: logits = log([1, 2, 1]) -> softmax = [0.25, 0.5, 0.25]; token 1 -> log 0.5 = -0.6931472.
    # Position 1: logits = [0, 0, 0, ...] + 7 (a constant shift changes nothing) -> uniform over V = 3;
    #             token 2 -> log(1/3) = -1.0986123.
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [7.0, 7.0, 7.0]]])  # [B=1, T=2, V=3]
    tokens = torch.tensor([[1, 2]])  # [1, 2]
    lp = token_logprobs(logits, tokens)
    assert lp.shape == (1, 2) and lp.dtype == torch.float32
    close(lp[0, 0], math.log(0.5), atol=ATOL_F32)
    close(lp[0, 1], -math.log(3.0), atol=ATOL_F32)


def test_token_logprobs_upcasts_low_precision_logits():
    # bf16 logits are upcast before log_softmax: the result is float32 and equals the float32 computation.
    logits = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.bfloat16)
    lp = token_logprobs(logits, torch.tensor([[3]]))
    assert lp.dtype == torch.float32
    # log softmax([1,2,3,4])[3] = 4 - log(e + e^2 + e^3 + e^4) = 4 - 4.4401897 = -0.4401897
    close(lp[0, 0], 4.0 - math.log(sum(math.exp(k) for k in (1, 2, 3, 4))), atol=ATOL_F32)


def test_entropy_by_hand():
    # p = [0.25, 0.5, 0.25]: H = -(2 * 0.25 * log 0.25 + 0.5 * log 0.5) = 0.6931472 + 0.3465736 = 1.0397208
    # uniform over V = 3: H = log 3 = 1.0986123
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [-3.0, -3.0, -3.0]]])  # [1, 2, 3]
    h = entropy_from_logits(logits)
    assert h.shape == (1, 2)
    close(h[0, 0], -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)), atol=ATOL_F32)
    close(h[0, 1], math.log(3.0), atol=ATOL_F32)


# --- aggregate --------------------------------------------------------------------------------------------------

# Two rows of different lengths; row 1's last position is masked and holds a huge value that must not count.
#   row 0: x = [1, 2, 3], 3 tokens, sum 6
#   row 1: x = [6, 10, 1e30], 2 tokens, sum 16
_AGG_X = [[1.0, 2.0, 3.0], [6.0, 10.0, 1e30]]
_AGG_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_aggregate_each_mode_by_hand():
    x, mask = t64(_AGG_X), t64(_AGG_MASK)
    # token-mean:          (6 + 16) / 5 tokens            = 4.4
    # seq-mean-token-mean: (6 / 3 + 16 / 2) / 2 rows      = (2 + 8) / 2 = 5
    # seq-mean-token-sum:  (6 + 16) / 2 rows              = 11
    close(aggregate(x, mask, "token-mean"), 4.4)
    close(aggregate(x, mask, "seq-mean-token-mean"), 5.0)
    close(aggregate(x, mask, "seq-mean-token-sum"), 11.0)
    close(aggregate(x, mask), 4.4)  # the default is token-mean


def test_aggregate_gradient_by_hand():
    # d/dx of each mode is mask times the weight of each token:
    #   token-mean:          1 / 5 everywhere
    #   seq-mean-token-mean: 1 / (T_b * N_seqs) = row 0: 1 / (3 * 2) = 1/6, row 1: 1 / (2 * 2) = 1/4
    #   seq-mean-token-sum:  1 / N_seqs = 1/2
    # and 0 on the masked position.
    mask = t64(_AGG_MASK)
    for agg, (w0, w1) in (("token-mean", (1 / 5, 1 / 5)), ("seq-mean-token-mean", (1 / 6, 1 / 4)),
                          ("seq-mean-token-sum", (1 / 2, 1 / 2))):
        x = t64(_AGG_X).requires_grad_(True)
        (grad,) = torch.autograd.grad(aggregate(x, mask, agg), x)
        torch.testing.assert_close(grad, t64([[w0, w0, w0], [w1, w1, 0.0]]), atol=ATOL, rtol=0)


def test_aggregate_global_counts_override():
    x, mask = t64(_AGG_X), t64(_AGG_MASK)
    # n_tokens = 11 (the global batch's tokens): token-mean = 22 / 11 = 2
    close(aggregate(x, mask, "token-mean", n_tokens=11), 2.0)
    # n_seqs = 4: seq-mean-token-mean = (2 + 8) / 4 = 2.5; seq-mean-token-sum = 22 / 4 = 5.5
    close(aggregate(x, mask, "seq-mean-token-mean", n_seqs=4), 2.5)
    close(aggregate(x, mask, "seq-mean-token-sum", n_seqs=t64(4.0)), 5.5)
    # each mode reads only its own count: n_seqs does not change a token mean, n_tokens not a sequence mean
    close(aggregate(x, mask, "token-mean", n_seqs=4), 4.4)
    close(aggregate(x, mask, "seq-mean-token-mean", n_tokens=11), 5.0)
    close(aggregate(x, mask, "seq-mean-token-sum", n_tokens=11), 11.0)


def test_aggregate_rows_without_tokens_are_not_sequences():
    # a third row, entirely masked (an expert row in the RL term, or padding): the default n_seqs is 2, not 3
    #   seq-mean-token-mean = (2 + 8) / 2 = 5 (not 10 / 3); seq-mean-token-sum = 22 / 2 = 11 (not 22 / 3)
    x = t64(_AGG_X + [[7.0, 7.0, 7.0]])
    mask = t64(_AGG_MASK + [[0.0, 0.0, 0.0]])
    close(aggregate(x, mask, "token-mean"), 4.4)
    close(aggregate(x, mask, "seq-mean-token-mean"), 5.0)
    close(aggregate(x, mask, "seq-mean-token-sum"), 11.0)
    # no tokens at all: 0 / clamp(0, min=1) = 0 in every mode, not nan
    for agg in LOSS_AGGS:
        assert num(aggregate(x, torch.zeros_like(mask), agg)) == 0.0


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(KeyError, match="unknown loss aggregation 'seq-sum'"):
        aggregate(t64(_AGG_X), t64(_AGG_MASK), "seq-sum")
    with pytest.raises(ValueError, match="LossSpec.agg: unknown loss aggregation 'seq-sum'"):
        LossSpec(agg="seq-sum")


# --- kl_penalty -------------------------------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    # log r = ref - logprobs = [-0.5, 1.0, 0.0 (masked: forced to 0 whatever the inputs)]
    #   k1 = -log r                = [0.5, -1.0, 0]
    #   k3 = exp(log r) - 1 - log r = [0.6065307 - 1 + 0.5, 2.7182818 - 1 - 1, 0] = [0.1065307, 0.7182818, 0]
    # gradients wrt logprobs (d log r / d logprobs = -1):
    #   k1: d(-log r) = +1 on each counted token
    #   k3: -(r - 1) = 1 - r = [1 - 0.6065307, 1 - 2.7182818, 0] = [0.3934693, -1.7182818, 0]
    mask = t64([[1.0, 1.0, 0.0]])
    ref = t64([[-1.5, -1.0, -0.2]])
    for est, expected, expected_grad in (
        ("k1", [0.5, -1.0, 0.0], [1.0, 1.0, 0.0]),
        ("k3", [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0], [1.0 - math.exp(-0.5), 1.0 - math.e, 0.0]),
    ):
        logprobs = t64([[-1.0, -2.0, -3.0]]).requires_grad_(True)
        kl = kl_penalty(logprobs, ref, mask, est)
        assert kl.shape == (1, 3)
        torch.testing.assert_close(kl.detach(), t64([expected]), atol=ATOL, rtol=0)
        (grad,) = torch.autograd.grad(kl.sum(), logprobs)
        torch.testing.assert_close(grad, t64([expected_grad]), atol=ATOL, rtol=0)
    # the default estimator is k3
    torch.testing.assert_close(kl_penalty(t64([[-1.0, -2.0, -3.0]]), ref, mask),
                               kl_penalty(t64([[-1.0, -2.0, -3.0]]), ref, mask, "k3"), atol=0, rtol=0)


def test_kl_penalty_k3_is_never_negative_where_k1_is():
    g = torch.Generator().manual_seed(7)
    logprobs = -torch.rand(4, 9, generator=g, dtype=F64) * 4
    ref = -torch.rand(4, 9, generator=g, dtype=F64) * 4
    mask = torch.ones(4, 9, dtype=F64)
    assert (kl_penalty(logprobs, ref, mask, "k1") < 0).any()  # the inputs reach k1's negative side
    assert (kl_penalty(logprobs, ref, mask, "k3") >= 0).all()


def test_kl_penalty_masked_positions_are_zero_even_with_extreme_values():
    # float32 as in the learner. Counted token: log r = -0.7 + 0.5 = -0.2 -> k1 = 0.2, k3 = 0.8187308 - 0.8 = 0.0187308
    # Masked positions: log p = -100 vs ref 0 (exp(100) = inf in float32), ref = -inf, and -inf - (-inf) = nan.
    inf = math.inf
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-0.7, 0.0, -inf, -inf]])
    for est, expected, expected_grad in (("k1", 0.2, 1.0), ("k3", math.exp(-0.2) - 0.8, 1.0 - math.exp(-0.2))):
        logprobs = torch.tensor([[-0.5, -100.0, -1.0, -inf]], requires_grad=True)
        kl = kl_penalty(logprobs, ref, mask, est)
        close(kl[0, 0], expected, atol=ATOL_F32)
        assert kl[0, 1:].tolist() == [0.0, 0.0, 0.0]
        (grad,) = torch.autograd.grad(kl.sum(), logprobs)
        assert torch.isfinite(grad).all()
        close(grad[0, 0], expected_grad, atol=ATOL_F32)  # 1 for k1; 1 - r = 1 - 0.8187308 = 0.1812692 for k3
        assert grad[0, 1:].tolist() == [0.0, 0.0, 0.0]


def test_kl_penalty_k3_clamped_at_ten():
    # log r = ref - logprobs = [2, 3, -20, -inf (a token the reference finds impossible)]
    #   k3 = [e^2 - 3, e^3 - 4, e^-20 + 19, inf] = [4.3890561, 16.0855369, 19.0000000, inf] -> [4.3890561, 10, 10, 10]
    #   gradient wrt logprobs: 1 - r = 1 - e^2 = -6.3890561 on the unclamped token, 0 where the clamp binds
    #   k1 = -log r = [-2, -3, 20, inf] is not clamped
    logprobs = t64([[-3.0, -4.0, -1.0, -1.0]]).requires_grad_(True)
    ref = t64([[-1.0, -1.0, -21.0, -math.inf]])
    mask = torch.ones(1, 4, dtype=F64)
    k3 = kl_penalty(logprobs, ref, mask, "k3")
    torch.testing.assert_close(k3.detach(), t64([[math.exp(2.0) - 3.0, 10.0, 10.0, 10.0]]), atol=ATOL, rtol=0)
    (grad,) = torch.autograd.grad(k3.sum(), logprobs)
    torch.testing.assert_close(grad, t64([[1.0 - math.exp(2.0), 0.0, 0.0, 0.0]]), atol=ATOL, rtol=0)
    assert kl_penalty(logprobs, ref, mask, "k1").tolist() == [[-2.0, -3.0, 20.0, math.inf]]


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_is_an_unbiased_estimate_of_kl_current_to_reference(estimator):
    # Tokens are sampled from the current policy p: weight each token of a 3-token vocabulary by p (mask = 1) and
    # sum, an exact expectation E_p[k]. With p = [0.5, 0.3, 0.2], ref = [0.7, 0.2, 0.1]:
    #   KL(p || ref) = 0.5 ln(0.5/0.7) + 0.3 ln(0.3/0.2) + 0.2 ln(0.2/0.1)
    #                = -0.1682361 + 0.1216395 + 0.1386294 = 0.0920328
    #   k1 per token = ln(p/ref)                 = [-0.3364722, 0.4054651, 0.6931472]
    #   k3 per token = ref/p - 1 - ln(ref/p)     = [0.0635278, 0.0721318, 0.1931472]
    #   E_p[k3] = 0.0317639 + 0.0216395 + 0.0386294 = 0.0920328 (sum ref - sum p = 0 leaves E_p[-log r])
    # The other direction, KL(ref || p) = 0.0851227 (test_kl_metric_is_an_unbiased_...), would be the wrong one.
    p = t64([[0.5, 0.3, 0.2]])
    ref = t64([[0.7, 0.2, 0.1]])
    kl = kl_penalty(p.log(), ref.log(), torch.ones_like(p), estimator)
    expected = 0.5 * math.log(0.5 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.1)
    close(expected, 0.0920328, atol=ATOL_7DP)
    close((kl * p).sum(), expected)


def test_kl_penalty_rejects_unknown_estimator():
    x = t64([[-1.0]])
    with pytest.raises(KeyError, match="unknown KL estimator 'k4'"):
        kl_penalty(x, x, torch.ones_like(x), "k4")
    with pytest.raises(ValueError, match="LossSpec.kl_estimator: unknown KL estimator 'k4'"):
        LossSpec(kl_estimator="k4")


# --- ppo_clip_loss ----------------------------------------------------------------------------------------------

# Two rows, T = 3, clip_eps = 0.2 (ratio clipped to [0.8, 1.2]); log_ratio = logprobs - old_logprobs:
#   row 0, A = +1, log_ratio = [0.1, 0.5, -0.5]
#   row 1, A = -2, log_ratio = [0.3, -0.5, 9.0], the last position masked out (a huge ratio that must not count)
_LOG_RATIO = [[0.1, 0.5, -0.5], [0.3, -0.5, 9.0]]
_ADV = [1.0, -2.0]
_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def _ppo_inputs():
    old = t64([[-1.0, -2.0, -0.7], [-1.5, -0.3, -4.0]])
    logprobs = (old + t64(_LOG_RATIO)).requires_grad_(True)
    return logprobs, old, t64(_ADV), t64(_MASK)


# the pg loss of _ppo_inputs summed over its 5 tokens (test_ppo_clip_loss_by_hand): 1.3880160
_PG_SUM = -math.exp(0.1) - 1.2 - math.exp(-0.5) + 2 * math.exp(0.3) + 1.6


def test_ppo_clip_loss_by_hand():
    logprobs, old, adv, mask = _ppo_inputs()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # pg_loss = max(-A * ratio, -A * clip(ratio, 0.8, 1.2)) per token:
    # row 0 (A = +1):
    #   t0: ratio = exp(0.1)  = 1.1051709, inside [0.8, 1.2]     -> -1.1051709           (not clipped)
    #   t1: ratio = exp(0.5)  = 1.6487213 -> clipped to 1.2      -> max(-1.6487, -1.2) = -1.2   (clipped)
    #   t2: ratio = exp(-0.5) = 0.6065307 -> clipped to 0.8      -> max(-0.6065, -0.8) = -0.6065307 (pessimistic
    #       side: the unclipped term wins, not counted as clipped)
    # row 1 (A = -2):
    #   t0: ratio = exp(0.3)  = 1.3498588 -> clipped to 1.2      -> max(2.6997, 2.4) = 2.6997176 (not clipped)
    #   t1: ratio = exp(-0.5) = 0.6065307 -> clipped to 0.8      -> max(1.2131, 1.6) = 1.6       (clipped)
    #   t2: masked
    # sum = -1.1051709 - 1.2 - 0.6065307 + 2.6997176 + 1.6 = 1.3880160; 5 tokens -> 0.2776032
    expected = (-math.exp(0.1) - 1.2 - math.exp(-0.5) + 2 * math.exp(0.3) + 1.6) / 5
    close(loss, expected)
    # clip_frac: 2 clipped tokens of 5 = 0.4
    close(metrics["clip_frac"], 0.4)
    # ratio: (1.1051709 + 1.6487213 + 0.6065307 + 1.3498588 + 0.6065307) / 5 = 1.0633625
    close(metrics["ratio"], (math.exp(0.1) + math.exp(0.5) + 2 * math.exp(-0.5) + math.exp(0.3)) / 5)
    # kl (k3) = exp(x) - 1 - x per token, x = logprobs - old_logprobs:
    #   0.0051709 + 0.1487213 + 0.1065307 + 0.0498588 + 0.1065307 = 0.4168124; / 5 = 0.0833625
    close(metrics["kl"], 0.4168124 / 5, atol=ATOL_7DP)
    assert all(not m.requires_grad for m in metrics.values())

    # d loss / d logprobs = d(-A * ratio)/d logprob / 5 = -A * ratio / 5 where the unclipped term is active, else 0:
    #   row 0: [-1.1051709 / 5, 0 (clipped), -0.6065307 / 5] = [-0.2210342, 0, -0.1213061]
    #   row 1: [2 * 1.3498588 / 5, 0 (clipped), 0 (masked)]  = [0.5399435, 0, 0]
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected_grad = t64([[-math.exp(0.1) / 5, 0.0, -math.exp(-0.5) / 5], [2 * math.exp(0.3) / 5, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected_grad, atol=ATOL, rtol=0)


def test_ppo_clip_loss_global_token_count():
    # With n_tokens = 20 (the global batch) the same sum 1.3880160 is divided by 20, not by the 5 local tokens.
    logprobs, old, adv, mask = _ppo_inputs()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, n_tokens=20)
    close(loss, _PG_SUM / 20)
    close(metrics["clip_frac"], 2 / 20)


def test_ppo_clip_loss_per_token_advantages_match_per_sequence():
    # advantages [B] broadcast over T must equal the same values given explicitly as [B, T].
    logprobs, old, adv, mask = _ppo_inputs()
    a, _ = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2)
    b, _ = ppo_clip_loss(logprobs, old, adv[:, None].expand(2, 3), mask, clip_eps=0.2)
    close(a, num(b))


def test_ppo_clip_loss_empty_mask_is_zero_not_nan():
    # A rank whose micro-batch holds only expert rows has no RL tokens: 0 / clamp(0, min=1) = 0.
    logprobs, old, adv, _ = _ppo_inputs()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, torch.zeros(2, 3, dtype=F64), clip_eps=0.2)
    assert num(loss) == 0.0
    assert all(num(m) == 0.0 for m in metrics.values())


def test_dual_clip_caps_loss_for_negative_advantages():
    # clip_eps = 0.2, dual_clip c = 3; one token per case, log_ratio x, advantage A.
    def loss_of(x: float, a: float, dual_clip):
        logprobs = t64([[x - 1.0]]).requires_grad_(True)
        loss, _ = ppo_clip_loss(logprobs, t64([[-1.0]]), t64([a]), t64([[1.0]]), clip_eps=0.2, dual_clip=dual_clip)
        (grad,) = torch.autograd.grad(loss, logprobs)
        return num(loss), num(grad)

    # A = -1, x = 2: ratio = exp(2) = 7.3890561; clip -> 1.2; max(7.3890561, 1.2) = 7.3890561 (plain PPO)
    loss, grad = loss_of(2.0, -1.0, None)
    close(loss, math.exp(2.0))
    close(grad, math.exp(2.0))  # d(-A * ratio)/dx = ratio
    #   with dual clip: min(7.3890561, -A * c = 3) = 3, and the gradient vanishes
    loss, grad = loss_of(2.0, -1.0, 3.0)
    close(loss, 3.0)
    close(grad, 0.0)
    # A = -1, x = 0.5: ratio = 1.6487213 -> max(1.6487213, 1.2) = 1.6487213 < 3: dual clip leaves it alone
    close(loss_of(0.5, -1.0, 3.0)[0], math.exp(0.5))
    # A = -1, x = -0.5: ratio = 0.6065307 -> max(0.6065307, 0.8) = 0.8 < 3: unchanged
    close(loss_of(-0.5, -1.0, 3.0)[0], 0.8)
    # A = +1, x = 2: max(-7.3890561, -1.2) = -1.2; the dual clip (A < 0 only) must not turn it into min(-1.2, -3)
    close(loss_of(2.0, 1.0, 3.0)[0], -1.2)
    # A = +1, x = -3: ratio = 0.0497871 -> max(-0.0497871, -0.8) = -0.0497871; unchanged by the dual clip
    close(loss_of(-3.0, 1.0, 3.0)[0], -math.exp(-3.0))


def test_ppo_metrics_ignore_masked_positions_with_extreme_logprobs():
    # In chord_loss the RL term sees expert rows masked out, with old_logprobs = 0 there, so log_ratio = logprobs.
    # An expert token with float32 log p = -100 gives exp(-log_ratio) = exp(100) = inf (float32 max ~ 3.4e38),
    # and (inf * mask 0).sum() = nan: the kl metric of the whole step becomes nan though that token does not count.
    logprobs = torch.tensor([[-0.5, -100.0]])
    old = torch.tensor([[-0.4, 0.0]])
    loss, metrics = ppo_clip_loss(logprobs, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), clip_eps=0.2)
    # the one counted token: log_ratio = -0.1, ratio = 0.9048374, loss = -0.9048374
    close(loss, -math.exp(-0.1), atol=ATOL_F32)
    # kl = exp(-0.1) - 1 + 0.1 = 0.0048374
    close(metrics["kl"], math.exp(-0.1) - 0.9, atol=ATOL_F32)


# The reference model's log-probabilities as shifts of the current ones: log r = ref - logprobs =
#   row 0: [-0.2, 0.1, 0.0]
#   row 1: [0.4, -0.5, 50.0], the last position masked (k1 = -50 and k3 clamped to 10 there if it counted)
_REF_SHIFT = [[-0.2, 0.1, 0.0], [0.4, -0.5, 50.0]]
# k1 = -log r = [0.2, -0.1, 0 | -0.4, 0.5]: sum 0.2, mean over 5 tokens 0.04
_K1_SUM = 0.2
# k3 = exp(log r) - 1 - log r:
#   -0.2: 0.8187308 - 0.8 = 0.0187308    0.1: 1.1051709 - 1.1 = 0.0051709    0.0: 0
#    0.4: 1.4918247 - 1.4 = 0.0918247   -0.5: 0.6065307 - 0.5 = 0.1065307
#   sum 0.2222570, mean over 5 tokens 0.0444514
_K3_SUM = sum(math.exp(d) - 1.0 - d for d in (-0.2, 0.1, 0.0, 0.4, -0.5))


def _ppo_ref(logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs.detach() + t64(_REF_SHIFT)


@pytest.mark.parametrize("estimator, kl_sum", [("k1", _K1_SUM), ("k3", _K3_SUM)])
def test_ppo_clip_loss_with_reference_kl_by_hand(estimator, kl_sum):
    close(_K3_SUM, 0.2222570, atol=ATOL_7DP)
    logprobs, old, adv, mask = _ppo_inputs()
    ref = _ppo_ref(logprobs)
    # loss = pg loss + kl_coef * mean kl = (1.3880160 + 0.5 * kl_sum) / 5
    #   k1: (1.3880160 + 0.1) / 5 = 0.2976032;  k3: (1.3880160 + 0.1111285) / 5 = 0.2998289
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, ref_logprobs=ref, kl_coef=0.5,
                                  kl_estimator=estimator)
    close(loss, (_PG_SUM + 0.5 * kl_sum) / 5)
    # ref_kl is the unscaled token mean of the penalty; the PPO metrics do not move
    close(metrics["ref_kl"], kl_sum / 5)
    close(metrics["clip_frac"], 0.4)
    # with the global token count (20) both terms are divided by 20
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, ref_logprobs=ref, kl_coef=0.5,
                                  kl_estimator=estimator, n_tokens=20)
    close(loss, (_PG_SUM + 0.5 * kl_sum) / 20)
    close(metrics["ref_kl"], kl_sum / 20)


def test_ppo_clip_loss_reference_kl_with_sequence_aggregation_by_hand():
    # seq-mean-token-sum, k1, kl_coef = 0.5: per row sum of pg_loss + 0.5 * k1
    #   row 0: -1.1051709 - 1.2 - 0.6065307 + 0.5 * (0.2 - 0.1 + 0) = -2.9117016 + 0.05 = -2.8617016
    #   row 1:  2.6997176 + 1.6 + 0.5 * (-0.4 + 0.5)               =  4.2997176 + 0.05 =  4.3497176
    #   / 2 rows = 0.7440080
    logprobs, old, adv, mask = _ppo_inputs()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, ref_logprobs=_ppo_ref(logprobs),
                                  kl_coef=0.5, kl_estimator="k1", agg="seq-mean-token-sum")
    close(loss, (_PG_SUM + 0.5 * _K1_SUM) / 2)
    close(loss, 0.7440080, atol=ATOL_7DP)
    # metrics stay token means whatever agg is: ref_kl = 0.2 / 5, clip_frac = 2 / 5
    close(metrics["ref_kl"], _K1_SUM / 5)
    close(metrics["clip_frac"], 0.4)


def test_ppo_clip_loss_zero_kl_coef_reports_ref_kl_without_changing_the_loss():
    logprobs, old, adv, mask = _ppo_inputs()
    plain, plain_metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2)
    (plain_grad,) = torch.autograd.grad(plain, logprobs)
    assert "ref_kl" not in plain_metrics
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, ref_logprobs=_ppo_ref(logprobs),
                                  kl_coef=0.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert num(loss) == num(plain)
    assert torch.equal(grad, plain_grad)
    # the penalty is still measured (default estimator k3): 0.2222570 / 5 = 0.0444514
    close(metrics["ref_kl"], _K3_SUM / 5)
    assert not metrics["ref_kl"].requires_grad


def test_ppo_clip_loss_k1_penalty_gradient_by_hand():
    # d/dlogp of kl_coef * sum(mask * (logp - ref)) / n_tokens = kl_coef / n_tokens on each counted token, 0 on the
    # masked one; the pg part of the gradient is unchanged (test_ppo_clip_loss_by_hand). kl_coef = 0.5:
    #   n_tokens = 5 (local): 0.1;  n_tokens = 20 (global): 0.025
    logprobs, old, adv, mask = _ppo_inputs()
    ref = _ppo_ref(logprobs)
    for n_tokens, step in ((None, 0.5 / 5), (20, 0.5 / 20)):
        plain, _ = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, n_tokens=n_tokens)
        (plain_grad,) = torch.autograd.grad(plain, logprobs)
        loss, _ = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, ref_logprobs=ref, kl_coef=0.5,
                                kl_estimator="k1", n_tokens=n_tokens)
        (grad,) = torch.autograd.grad(loss, logprobs)
        torch.testing.assert_close(grad - plain_grad, step * mask, atol=ATOL, rtol=0)


# --- sft_loss ---------------------------------------------------------------------------------------------------


def _sft_inputs():
    # p = [0.5, 0.25, 0.9]; the third token is masked out
    logprobs = t64([[math.log(0.5), math.log(0.25), math.log(0.9)]]).requires_grad_(True)
    return logprobs, t64([[1.0, 1.0, 0.0]])


def test_sft_loss_by_hand():
    logprobs, mask = _sft_inputs()
    loss, metrics = sft_loss(logprobs, mask)
    # nll = [log 2, log 4] = [0.6931472, 1.3862944]; mean over 2 tokens = 1.0397208
    close(loss, (math.log(2.0) + math.log(4.0)) / 2)
    close(metrics["nll"], (math.log(2.0) + math.log(4.0)) / 2)
    # d loss / d logprobs = -mask / 2 = [-0.5, -0.5, 0]
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t64([[-0.5, -0.5, 0.0]]), atol=ATOL, rtol=0)


def test_sft_loss_phi_weighting_by_hand():
    logprobs, mask = _sft_inputs()
    loss, metrics = sft_loss(logprobs, mask, phi=True)
    # phi(p) = p * (1 - p): p = 0.5 -> 0.25; p = 0.25 -> 0.1875
    # weighted nll = [0.25 * log 2, 0.1875 * log 4] = [0.1732868, 0.2599302]; mean over 2 = 0.2166085
    close(loss, (0.25 * math.log(2.0) + 0.1875 * math.log(4.0)) / 2)
    # the nll metric stays unweighted: (0.6931472 + 1.3862944) / 2 = 1.0397208
    close(metrics["nll"], (math.log(2.0) + math.log(4.0)) / 2)
    # p is detached, so d loss / d logprobs = -phi(p) / 2 = [-0.125, -0.09375, 0]
    # (were p not detached, d(-logp * phi)/d logp = -phi - logp * p(1 - 2p) would make the second entry
    #  (-0.1875 + log 4 * 0.25 * 0.5) / 2 = (-0.1875 + 0.1732868) / 2 = -0.0071066)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t64([[-0.125, -0.09375, 0.0]]), atol=ATOL, rtol=0)


def test_sft_loss_global_token_count():
    # n_tokens = 8: (0.6931472 + 1.3862944) / 8 = 0.2599302
    logprobs, mask = _sft_inputs()
    close(sft_loss(logprobs, mask, n_tokens=8)[0], (math.log(2.0) + math.log(4.0)) / 8)


# --- chord_loss ---------------------------------------------------------------------------------------------------


def test_chord_loss_by_hand_each_term_normalised_over_its_own_rows():
    # row 0 on-policy, A = 0.5, log_ratio = [0, 0] -> ratio 1 -> pg_loss = [-0.5, -0.5] -> l_rl = -1.0 / 2 = -0.5
    # row 1 expert, one response token with p = 0.5 (second position masked) -> l_sft = log 2 / 1 = 0.6931472
    # mu = 0.25: loss = 0.75 * (-0.5) + 0.25 * 0.6931472 = -0.375 + 0.1732868 = -0.2017132
    # (normalising over the 3 tokens of the mixed batch instead would give 0.75 * -1/3 + 0.25 * 0.2310491)
    logprobs = t64([[-0.2, -0.7], [math.log(0.5), -3.0]])
    old = t64([[-0.2, -0.7], [0.0, 0.0]])
    mask = t64([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = chord_loss(logprobs, old, t64([0.5, 0.0]), mask, torch.tensor([False, True]),
                               mu=0.25, clip_eps=0.2)
    close(loss, 0.75 * -0.5 + 0.25 * math.log(2.0))
    close(metrics["rl_loss"], -0.5)
    close(metrics["sft_loss"], math.log(2.0))
    close(metrics["sft_nll"], math.log(2.0))
    close(metrics["loss"], num(loss))
    # Given the step's global counts (10 on-policy, 4 expert tokens) each sum goes over its own count:
    # 0.75 * (-1.0 / 10) + 0.25 * (0.6931472 / 4) = -0.075 + 0.0433217 = -0.0316783
    loss, metrics = chord_loss(logprobs, old, t64([0.5, 0.0]), mask, torch.tensor([False, True]),
                               mu=0.25, clip_eps=0.2, n_rl_tokens=10, n_sft_tokens=4)
    close(loss, 0.75 * (-1.0 / 10) + 0.25 * (math.log(2.0) / 4))
    close(metrics["sft_nll"], math.log(2.0) / 4)


def _random_batch(seed: int, B: int = 7, T: int = 6):
    """A mixed batch: random prompt/padding masks, some clipped ratios, alternating expert rows."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logprobs + (torch.rand(B, T, generator=g, dtype=F64) - 0.5)  # |log_ratio| <= 0.5: some clip at 0.2
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        start = int(torch.randint(0, 2, (), generator=g))
        end = int(torch.randint(start + 1, T + 1, (), generator=g))
        mask[i, start:end] = 1.0
    is_expert = torch.tensor([i % 3 == 1 for i in range(B)])
    old[is_expert] = 0.0  # as the driver builds expert rows
    adv[is_expert] = 0.0
    return logprobs, old, adv, mask, is_expert


@pytest.mark.parametrize("phi", [False, True])
def test_chord_mu_one_is_sft_on_expert_rows(phi):
    logprobs, old, adv, mask, is_expert = _random_batch(0)
    loss, _ = chord_loss(logprobs, old, adv, mask, is_expert, mu=1.0, clip_eps=0.2, dual_clip=3.0, phi=phi)
    expected, _ = sft_loss(logprobs[is_expert], mask[is_expert], phi=phi)
    close(loss, num(expected), atol=ATOL_EXACT)
    assert num(expected) != 0.0


def test_chord_mu_zero_is_ppo_on_policy_rows():
    logprobs, old, adv, mask, is_expert = _random_batch(1)
    on = ~is_expert
    loss, metrics = chord_loss(logprobs, old, adv, mask, is_expert, mu=0.0, clip_eps=0.2, dual_clip=3.0, phi=True)
    expected, ppo_metrics = ppo_clip_loss(logprobs[on], old[on], adv[on], mask[on], clip_eps=0.2, dual_clip=3.0)
    close(loss, num(expected), atol=ATOL_EXACT)
    for name in ("clip_frac", "ratio", "kl"):
        close(metrics[name], num(ppo_metrics[name]), atol=ATOL_EXACT)
    assert num(expected) != 0.0 and num(ppo_metrics["clip_frac"]) > 0  # the clip is exercised


def test_chord_split_sums_to_unsplit_loss_and_gradient():
    """Data-parallel ranks / micro-batches: with the global token counts the parts sum to the whole."""
    logprobs, old, adv, mask, is_expert = _random_batch(2)
    logprobs.requires_grad_(True)
    n_rl = mask[~is_expert].sum()
    n_sft = mask[is_expert].sum()
    kw = dict(mu=0.3, clip_eps=0.2, dual_clip=3.0, phi=True)
    full, full_metrics = chord_loss(logprobs, old, adv, mask, is_expert, n_rl_tokens=n_rl, n_sft_tokens=n_sft, **kw)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    # the global counts of the whole batch are its own counts: same loss as the defaults
    close(full, num(chord_loss(logprobs, old, adv, mask, is_expert, **kw)[0]), atol=ATOL_EXACT)

    parts = [slice(0, 2), slice(2, 3), slice(3, 7)]  # uneven; the middle part has no expert row (n_sft local = 0)
    assert not is_expert[parts[1]].any()
    total, grad_sum = 0.0, torch.zeros_like(logprobs)
    metric_sums = {k: 0.0 for k in full_metrics}
    local_total = 0.0
    for s in parts:
        loss, metrics = chord_loss(logprobs[s], old[s], adv[s], mask[s], is_expert[s],
                                   n_rl_tokens=n_rl, n_sft_tokens=n_sft, **kw)
        (g,) = torch.autograd.grad(loss, logprobs)  # zero outside the part's rows
        total, grad_sum = total + num(loss), grad_sum + g
        for k in metric_sums:
            metric_sums[k] += num(metrics[k])
        local_total += num(chord_loss(logprobs[s], old[s], adv[s], mask[s], is_expert[s], **kw)[0])

    close(full, total, atol=ATOL_EXACT)
    torch.testing.assert_close(grad_sum, full_grad, atol=ATOL_EXACT, rtol=0)
    for k, v in metric_sums.items():  # the driver sums per-rank metrics too
        close(full_metrics[k], v, atol=ATOL_EXACT)
    # the test can fail: normalising by each part's own token count does not add up
    assert abs(local_total - num(full)) > 1e-3


def _random_ref(logprobs: torch.Tensor, seed: int) -> torch.Tensor:
    """Reference log-probabilities ``logprobs + u``, u uniform in [-0.8, 0.2] (no graph): mostly below the current
    ones, so that the token mean of k1 stays well away from 0."""
    g = torch.Generator().manual_seed(seed)
    return logprobs.detach() + (torch.rand(logprobs.shape, generator=g, dtype=F64) - 0.8)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_ppo_split_sums_to_unsplit_loss_and_gradient_for_every_agg(agg, kl_estimator):
    """As test_chord_split_sums_to_unsplit_loss_and_gradient, for each aggregation, with the reference KL on:
    with the global n_tokens / n_seqs the parts' losses and gradients sum to the whole batch's."""
    logprobs, old, adv, mask, _ = _random_batch(3)
    mask[2] = 0.0  # a row without tokens: not a sequence of the global count
    ref = _random_ref(logprobs, 4)
    logprobs.requires_grad_(True)
    n_tokens, n_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    assert int(n_seqs) == 6
    kw = dict(clip_eps=0.2, dual_clip=3.0, kl_coef=0.3, kl_estimator=kl_estimator, agg=agg)
    full, full_metrics = ppo_clip_loss(logprobs, old, adv, mask, ref_logprobs=ref, n_tokens=n_tokens, n_seqs=n_seqs,
                                       **kw)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    # the global counts of the whole batch are its own counts: same loss as the defaults
    close(full, num(ppo_clip_loss(logprobs, old, adv, mask, ref_logprobs=ref, **kw)[0]), atol=ATOL_EXACT)
    # the KL term is on: it moves the loss
    no_kl, _ = ppo_clip_loss(logprobs, old, adv, mask, ref_logprobs=ref, **{**kw, "kl_coef": 0.0})
    assert abs(num(full) - num(no_kl)) > 1e-2

    parts = [slice(0, 2), slice(2, 3), slice(3, 7)]  # uneven; the middle part is the row without tokens
    total, grad_sum, local_total = 0.0, torch.zeros_like(logprobs), 0.0
    metric_sums = {k: 0.0 for k in full_metrics}
    for s in parts:
        loss, metrics = ppo_clip_loss(logprobs[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], n_tokens=n_tokens,
                                      n_seqs=n_seqs, **kw)
        (g,) = torch.autograd.grad(loss, logprobs)  # zero outside the part's rows
        total, grad_sum = total + num(loss), grad_sum + g
        for k in metric_sums:
            metric_sums[k] += num(metrics[k])
        local_total += num(ppo_clip_loss(logprobs[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], **kw)[0])

    close(full, total, atol=ATOL_EXACT)
    torch.testing.assert_close(grad_sum, full_grad, atol=ATOL_EXACT, rtol=0)
    assert "ref_kl" in metric_sums
    for k, v in metric_sums.items():
        close(full_metrics[k], v, atol=ATOL_EXACT)
    # the test can fail: normalising by each part's own counts does not add up
    assert abs(local_total - num(full)) > 1e-3


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_chord_agg_and_kl_apply_to_the_rl_term_only(agg):
    logprobs, old, adv, mask, is_expert = _random_batch(5)
    on = ~is_expert
    ref = _random_ref(logprobs, 6)
    base = dict(clip_eps=0.2, dual_clip=3.0, phi=True)
    rl = dict(ref_logprobs=ref, kl_coef=0.5, kl_estimator="k1", agg=agg)
    # mu = 1: only the SFT term, a token mean over the expert rows, whatever agg and the KL settings say
    loss, metrics = chord_loss(logprobs, old, adv, mask, is_expert, mu=1.0, **base, **rl)
    plain, _ = chord_loss(logprobs, old, adv, mask, is_expert, mu=1.0, **base)
    close(loss, num(plain), atol=ATOL_EXACT)
    close(loss, num(sft_loss(logprobs[is_expert], mask[is_expert], phi=True)[0]), atol=ATOL_EXACT)
    assert "ref_kl" in metrics
    # mu = 0: the RL term is ppo_clip_loss on the on-policy rows with the same agg and KL; expert rows are masked
    # out of the RL term, so its default n_seqs counts the on-policy rows only
    for n_seqs in (None, 10):
        loss, metrics = chord_loss(logprobs, old, adv, mask, is_expert, mu=0.0, n_rl_seqs=n_seqs, **base, **rl)
        expected, expected_metrics = ppo_clip_loss(
            logprobs[on], old[on], adv[on], mask[on], clip_eps=0.2, dual_clip=3.0, ref_logprobs=ref[on],
            kl_coef=0.5, kl_estimator="k1", agg=agg, n_seqs=n_seqs,
        )
        close(loss, num(expected), atol=ATOL_EXACT)
        close(metrics["ref_kl"], num(expected_metrics["ref_kl"]), atol=ATOL_EXACT)
    # ... and the KL settings do move the RL term
    plain, _ = chord_loss(logprobs, old, adv, mask, is_expert, mu=0.0, agg=agg, **base)
    assert abs(num(loss) - num(plain)) > 1e-3


def test_kl_metric_is_an_unbiased_estimate_of_kl_behaviour_to_current():
    # Over a 3-token vocabulary, weight each token's k3 by its behaviour probability q (mask = q, n_tokens = 1):
    # the expectation E_q[exp(x) - 1 - x], x = log p - log q, must equal KL(q || p) exactly.
    #   q = [0.7, 0.2, 0.1], p = [0.5, 0.3, 0.2]
    #   KL(q || p) = 0.7 ln(0.7/0.5) + 0.2 ln(0.2/0.3) + 0.1 ln(0.1/0.2)
    #              = 0.2355304 - 0.0810930 - 0.0693147 = 0.0851227
    q = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    _, metrics = ppo_clip_loss(p.log(), q.log(), torch.tensor([1.0], dtype=torch.float64), q, clip_eps=0.2,
                               n_tokens=1.0)
    close(metrics["kl"], 0.0851227, atol=ATOL_F32)


# --- value_loss -------------------------------------------------------------------------------------------------

# clip_eps = 0.2: v_clip = V_old + clip(V - V_old, -0.2, 0.2); l1 = (V - R)^2, l2 = (v_clip - R)^2
#   row 0, 3 tokens:
#     a: V = 1.0,  V_old = 0.5, R = 0.0: v_clip = 0.7;  l1 = 1.00, l2 = 0.49 -> 1.00 (clip outside, not binding)
#     b: V = 1.0,  V_old = 0.5, R = 2.0: v_clip = 0.7;  l1 = 1.00, l2 = 1.69 -> 1.69 (binding)
#     c: V = 0.3,  V_old = 0.4, R = 0.5: v_clip = 0.3 (V - V_old = -0.1 inside); l1 = l2 = 0.04 -> 0.04 (not binding)
#   row 1, 1 token, then two masked positions (a huge value among them):
#     d: V = -0.5, V_old = 0.0, R = -1.0: v_clip = -0.2; l1 = 0.25, l2 = 0.64 -> 0.64 (binding, lower side)
_VALUES = [[1.0, 1.0, 0.3], [-0.5, 1e3, 7.0]]
_OLD_VALUES = [[0.5, 0.5, 0.4], [0.0, 0.0, 0.0]]
_RETURNS = [[0.0, 2.0, 0.5], [-1.0, 0.0, 0.0]]
_VALUE_MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def _value_inputs():
    return t64(_VALUES).requires_grad_(True), t64(_OLD_VALUES), t64(_RETURNS), t64(_VALUE_MASK)


def test_value_loss_without_clipping_by_hand():
    values, old, returns, mask = _value_inputs()
    loss, metrics = value_loss(values, old, returns, mask)
    # 0.5 * (1.00 + 1.00 + 0.04 + 0.25) / 4 = 0.5 * 0.5725 = 0.28625
    close(loss, 0.28625)
    close(metrics["value_loss"], 0.28625)
    close(metrics["value_clip_frac"], 0.0)
    # value_mean = (1.0 + 1.0 + 0.3 - 0.5) / 4 = 0.45
    close(metrics["value_mean"], 0.45)
    # value_zero_loss = 0.5 * (0 + 4 + 0.25 + 1) / 4 = 0.65625 (the masked positions' returns do not count)
    close(metrics["value_zero_loss"], 0.65625)
    # d loss / dV = 0.5 * 2 (V - R) / 4 = (V - R) / 4 = [0.25, -0.25, -0.05 | 0.125, 0, 0]
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, t64([[0.25, -0.25, -0.05], [0.125, 0.0, 0.0]]), atol=ATOL, rtol=0)


def test_value_loss_with_clipping_by_hand():
    values, old, returns, mask = _value_inputs()
    loss, metrics = value_loss(values, old, returns, mask, clip_eps=0.2)
    # 0.5 * (1.00 + 1.69 + 0.04 + 0.64) / 4 = 0.5 * 3.37 / 4 = 0.42125
    close(loss, 0.42125)
    close(metrics["value_loss"], 0.42125)
    # b and d clipped: 2 of 4 tokens (c, where l1 = l2, is not)
    close(metrics["value_clip_frac"], 0.5)
    close(metrics["value_mean"], 0.45)
    assert all(not m.requires_grad for m in metrics.values())
    # where the clipped term wins, its V sits at the clamp's bound: no gradient. Elsewhere (V - R) / 4:
    #   [0.25 (a: l1 wins though V - V_old is outside the clip range), 0 (b), -0.05 (c), | 0 (d), 0, 0]
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, t64([[0.25, 0.0, -0.05], [0.0, 0.0, 0.0]]), atol=ATOL, rtol=0)
    # with the global token count (8): 0.5 * 3.37 / 8 = 0.210625, clip_frac 2 / 8
    loss, metrics = value_loss(values, old, returns, mask, clip_eps=0.2, n_tokens=8)
    close(loss, 0.210625)
    close(metrics["value_clip_frac"], 0.25)


def test_value_loss_aggregations_by_hand():
    values, old, returns, mask = _value_inputs()
    # per-token clipped losses: row 0 [1.00, 1.69, 0.04] (sum 2.73, 3 tokens), row 1 [0.64] (1 token)
    #   seq-mean-token-mean: 0.5 * (2.73 / 3 + 0.64) / 2 = 0.5 * (0.91 + 0.64) / 2 = 0.3875
    #   seq-mean-token-sum:  0.5 * (2.73 + 0.64) / 2     = 0.8425
    #   with n_seqs = 5:     0.5 * 3.37 / 5              = 0.337
    close(value_loss(values, old, returns, mask, clip_eps=0.2, agg="seq-mean-token-mean")[0], 0.3875)
    close(value_loss(values, old, returns, mask, clip_eps=0.2, agg="seq-mean-token-sum")[0], 0.8425)
    close(value_loss(values, old, returns, mask, clip_eps=0.2, agg="seq-mean-token-sum", n_seqs=5)[0], 0.337)
    # the metrics other than value_loss stay token means
    _, metrics = value_loss(values, old, returns, mask, clip_eps=0.2, agg="seq-mean-token-sum")
    close(metrics["value_loss"], 0.8425)
    close(metrics["value_clip_frac"], 0.5)
    with pytest.raises(KeyError, match="unknown loss aggregation 'mean'"):
        value_loss(values, old, returns, mask, agg="mean")


def test_value_loss_ignores_non_finite_padding():
    # 1e20 squared overflows float32 to inf, and inf * 0 = nan: positions outside the mask must not be used at all.
    # Counted position: V = 0.5, R = 0 -> 0.5 * 0.25 = 0.125
    v = torch.tensor([[0.5, 1e20]])
    loss, _ = value_loss(v, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    close(loss, 0.125, atol=ATOL_F32)


def test_value_clip_fraction_is_not_moved_by_rounding():
    # Inside the clip range the clipped value is the value itself, so l2 == l1 exactly: no token counts as clipped and
    # the loss is the unclipped one. (old + (v - old) differs from v by a rounding error for many pairs, e.g.
    # 0.7 + (0.3 - 0.7) = 0.29999999999999993.)
    g = torch.Generator().manual_seed(0)
    old = torch.rand(64, 8, generator=g, dtype=F64)
    values = old + (torch.rand(64, 8, generator=g, dtype=F64) - 0.5) * 0.3  # |delta| <= 0.15 < eps = 0.2
    returns = torch.rand(64, 8, generator=g, dtype=F64)
    mask = torch.ones(64, 8, dtype=F64)
    clipped, metrics = value_loss(values, old, returns, mask, clip_eps=0.2)
    plain, _ = value_loss(values, old, returns, mask)
    assert num(metrics["value_clip_frac"]) == 0.0
    assert num(clipped) == num(plain)
