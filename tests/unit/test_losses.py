"""learners/losses.py: expected values computed by hand (arithmetic in the comments), invariance checks."""

from __future__ import annotations

import math

import pytest
import torch

from learners.losses import chord_loss, entropy_from_logits, ppo_clip_loss, sft_loss, token_logprobs

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
    close(loss, (-math.exp(0.1) - 1.2 - math.exp(-0.5) + 2 * math.exp(0.3) + 1.6) / 20)
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
