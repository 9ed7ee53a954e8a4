"""The learner's loss as pure functions of tensors: the registered parts (aggregations, KL estimators, policy losses,
importance-sampling corrections, SFT token weights: learners/registry.py), the ``LossSpec`` that names the ones a run
uses, and the losses that put them together (:func:`rl_loss`, :func:`sft_loss`, :func:`chord_loss`, and the critic's
:func:`value_loss`).

Every loss returns ``(loss, metrics)``: ``loss`` is a scalar tensor with a graph, ``metrics`` a dict of
detached scalar tensors (no ``.item()`` here: the learner reduces them once per step).

Shapes: ``B`` rows, ``T`` response positions. ``mask`` is 1.0 on tokens that count (response tokens of the
row), 0.0 on prompt and padding. Token means are ``sum(x * mask) / n_tokens``; ``n_tokens`` defaults to
``mask.sum()`` but the learner passes the token count of the whole global batch, so that a batch split across
data-parallel ranks or micro-batches sums to exactly the loss of the unsplit batch. Sequence means divide by
``n_seqs`` (default: the rows with at least one counted token) for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from learners.registry import Registry


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens[b, t] | ...) from ``logits[b, t]``: [B, T, V], [B, T] -> [B, T] (float32)."""
    logits = logits.float()
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position: [B, T, V] -> [B, T]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _token_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None) -> Tensor:
    n = mask.sum() if n_tokens is None else n_tokens
    return (x * mask).sum() / torch.clamp(torch.as_tensor(n, dtype=x.dtype, device=x.device), min=1.0)


def _seq_count(mask: Tensor, n_seqs: Tensor | float | None) -> Tensor:
    n = (mask.sum(-1) > 0).sum() if n_seqs is None else n_seqs
    return torch.clamp(torch.as_tensor(n, dtype=mask.dtype, device=mask.device), min=1.0)


@dataclass(frozen=True)
class LossSpec:
    """What the learner's loss is, chosen once from the config (actors/config.py: ``loss_spec``). The names are keys
    of the registries below; an unknown one raises at construction."""

    policy_loss: str = "ppo"  # POLICY_LOSSES: ppo (token ratio) | gspo (sequence ratio)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]; clip_high > clip_low is DAPO's clip-higher
    clip_high: float = 0.2
    dual_clip: float | None = None  # c > 1: for A < 0 the loss is capped at -A * c (Ye et al. 2020)
    agg: str = "token-mean"  # AGGREGATIONS: how the RL term's per-token loss becomes one number
    agg_norm: float = 1.0  # the constant of seq-mean-token-sum-norm (Dr. GRPO: the generation budget in tokens)
    sft_weight: str = "nll"  # SFT_WEIGHTS: per-token weight of the expert NLL (phi: CHORD-phi)
    kl_estimator: str = "k3"  # KL_ESTIMATORS: the per-token KL(policy || reference) estimate (loss term and metric)
    kl_coef: float = 0.0  # its weight in the RL loss (0: measured only, when reference log-probabilities are given)
    is_correction: str = "none"  # IS_CORRECTIONS: weight of each token for the engine/learner mismatch
    is_cap: float = 2.0  # C: the importance ratio's truncation (or mask) threshold
    temperature: float = 1.0  # the distribution the engines sampled from: logits / temperature, then the top-p
    top_p: float = 1.0  #       nucleus; every log-probability the learner computes (the expert rows' and the
    #                           reference's too) is on that distribution (learners/sampling.py)

    def __post_init__(self):
        for name, registry in (("policy_loss", POLICY_LOSSES), ("agg", AGGREGATIONS), ("sft_weight", SFT_WEIGHTS),
                               ("kl_estimator", KL_ESTIMATORS), ("is_correction", IS_CORRECTIONS)):
            if (value := getattr(self, name)) not in registry:
                raise ValueError(f"LossSpec.{name}: unknown {registry.kind} {value!r}; "
                                 f"expected one of {list(registry)}")


# --- loss aggregations: [B, T] per-token values -> one number ----------------------------------------------------
# Each takes the global counts (``n_tokens``, ``n_seqs``) so that parts of a batch sum to the whole; ``norm`` is the
# constant of seq-mean-token-sum-norm.

AGGREGATIONS: Registry = Registry("loss aggregation")


@AGGREGATIONS.register("token-mean")
def token_mean(x: Tensor, mask: Tensor, *, n_tokens=None, n_seqs=None, norm: float = 1.0) -> Tensor:
    """sum_{b,t} x / N_tokens: every token weighs the same (DAPO, Yu et al. 2025, eq. 8)."""
    return _token_mean(x, mask, n_tokens)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(x: Tensor, mask: Tensor, *, n_tokens=None, n_seqs=None, norm: float = 1.0) -> Tensor:
    """sum_b (sum_t x / T_b) / N_seqs: every sequence weighs the same (GRPO, Shao et al. 2024, eq. 3; GSPO)."""
    per_seq = (x * mask).sum(-1) / torch.clamp(mask.sum(-1), min=1.0)  # [B]
    return per_seq.sum() / _seq_count(mask, n_seqs)


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(x: Tensor, mask: Tensor, *, n_tokens=None, n_seqs=None, norm: float = 1.0) -> Tensor:
    """sum_b (sum_t x) / N_seqs: long sequences weigh more, and the loss's scale follows the batch's lengths."""
    return (x * mask).sum() / _seq_count(mask, n_seqs)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, *, n_tokens=None, n_seqs=None, norm: float = 1.0) -> Tensor:
    """sum_{b,t} x / (N_seqs * L): Dr. GRPO (Liu et al. 2025, sec. 3.1), no length normalisation per sequence; the
    constant L (``norm``, the generation budget) keeps the scale of the gradient fixed whatever the responses'
    lengths, where token-mean divides by the batch's own token count."""
    return (x * mask).sum() / (_seq_count(mask, n_seqs) * norm)


# --- KL estimators: per-token estimates of KL(policy || reference) from tokens the policy sampled ------------------
# Each maps log r = ref_logprobs - logprobs ([B, T], 0 at masked positions) to a per-token value. As a loss term the
# gradient flows through ``logprobs`` only (the samples are fixed), so what matters there is the expected gradient
# (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"); with p the policy:
#   k1 = -log r            E_p[k1] = KL(p || ref);  E_p[grad k1] = E_p[grad log p] = 0: as a loss it regularises
#                          nothing, so it is offered only in the reward (algo.kl_penalty: reward)
#   k2 = (log r)^2 / 2     biased value;            E_p[grad k2] = E_p[(log p - log ref) grad log p] = grad KL(p || ref)
#   k3 = (r - 1) - log r   E_p[k3] = KL(p || ref);  E_p[grad k3] = E_p[(1 - r) grad log p] = -sum ref grad log p
#                          = grad KL(ref || p): as a loss it pulls towards the *forward* KL, mass-covering
# The tests check each expectation exactly over a small vocabulary (tests/unit/test_losses.py).

KL_ESTIMATORS: Registry = Registry("KL estimator")


def ref_log_ratio(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log r = ref_logprobs - logprobs where mask is 1, else 0 (so that -inf - -inf = nan cannot leak in)."""
    return torch.where(mask > 0, ref_logprobs - logprobs, torch.zeros_like(logprobs))


def kl_reward(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, coef: float, estimator: str) -> Tensor:
    """``algo.kl_penalty: reward``: each token's reward -coef * k(log r), r = ref / policy, for tokens the policy
    sampled (``logprobs``: the rollouts' own, [B, T]). Through the policy gradient this regularises KL(policy || ref)
    with any estimator, k1 included (its value is unbiased; only its gradient as a loss term is 0). [B, T], 0 where
    mask is 0."""
    return -coef * KL_ESTIMATORS[estimator](ref_log_ratio(logprobs, ref_logprobs, mask))  # every k(0) is 0


@KL_ESTIMATORS.register("k1")
def kl_k1(log_r: Tensor) -> Tensor:
    return -log_r


@KL_ESTIMATORS.register("k2")
def kl_k2(log_r: Tensor) -> Tensor:
    return 0.5 * log_r.square()


@KL_ESTIMATORS.register("k3")
def kl_k3(log_r: Tensor) -> Tensor:
    """Clamped at 10 per token (as verl) so that one token the reference finds impossible cannot blow up the step."""
    return torch.clamp(torch.exp(log_r) - 1.0 - log_r, max=10.0)


# --- policy losses: per-token PPO-style losses [B, T] and per-token indicators for the metrics --------------------

POLICY_LOSSES: Registry = Registry("policy loss")


def _clipped_objective(ratio: Tensor, advantages: Tensor, spec: LossSpec) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic clipped objective on any ratio [B, T] (token or sequence level), advantages [B, T]:

        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
        pg_loss  = max(pg_loss1, pg_loss2)
        dual clip (Ye et al. 2020), A < 0 only:  pg_loss = min(pg_loss, -A * c)

    Indicators: ``clipped`` where the clipped term is the larger (its gradient is 0), ``dual_clipped`` where the
    dual clip's cap binds (gradient 0 too, for a ratio far above 1 + clip_high with A < 0)."""
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - spec.clip_low, 1.0 + spec.clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)
    dual = torch.zeros_like(pg_loss, dtype=torch.bool)
    if spec.dual_clip is not None:
        pg_loss3 = -advantages * spec.dual_clip
        dual = (advantages < 0) & (pg_loss3 < pg_loss)
        pg_loss = torch.where(dual, pg_loss3, pg_loss)
    return pg_loss, {"clipped": (pg_loss2 > pg_loss1).detach(), "dual_clipped": dual.detach()}


@POLICY_LOSSES.register("ppo")
def ppo_clip(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
             spec: LossSpec) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip with the token-level ratio (Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3):
    ratio_t = exp(logprobs_t - old_logprobs_t). [B, T] -> per-token loss [B, T], indicators."""
    # Positions outside the mask get log_ratio 0, not their raw value: an expert token with log p = -100 would make
    # exp(-log_ratio) infinite, and inf * 0 is nan however well the mask is applied afterwards.
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B, T]
    ratio = torch.exp(log_ratio)
    pg_loss, stats = _clipped_objective(ratio, advantages, spec)
    return pg_loss, {**stats, "ratio": ratio.detach()}


@POLICY_LOSSES.register("gspo")
def gspo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
         spec: LossSpec) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, eqs. 5-7, "GSPO-token"): the ratio of the whole sequence, length-normalised,

        s_b     = exp( sum_t mask * (logprobs - old_logprobs) / T_b )       # [B], the geometric mean token ratio
        s_{b,t} = sg[s_b] * exp(logprobs_t - sg[logprobs_t])                # value s_b, gradient s_b * grad log p_t

    clipped as PPO (the paper's ranges are small: 3e-4 / 4e-4). Every token of a row then has the same ratio, so the
    clip keeps or drops whole sequences; with ``seq-mean-token-mean`` aggregation and one advantage per sequence this
    is GSPO's objective exactly, its gradient sum_t s_b grad log p_t / T_b. [B, T] -> [B, T], indicators."""
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B, T]
    seq_log_ratio = log_ratio.sum(-1) / torch.clamp(mask.sum(-1), min=1.0)  # [B]
    token_logprobs_ = torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + token_logprobs_ - token_logprobs_.detach())  # [B, T]
    pg_loss, stats = _clipped_objective(ratio, advantages, spec)
    return pg_loss, {**stats, "ratio": ratio.detach()}


# --- importance-sampling corrections of the engine/learner mismatch -----------------------------------------------
# The engines sample with their own kernels and precision, so their log-probabilities (the behaviour policy, mu)
# differ from the learner's for the same weights (the proximal policy, old_logprobs recomputed by the learner). The
# PPO ratio is taken against the proximal policy; these weights correct for the tokens having been drawn from the
# behaviour one (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
#   rho_t = exp(old_logprobs_t - behaviour_logprobs_t)      token level
#   rho_b = exp(sum_t (old_logprobs_t - behaviour_logprobs_t))  sequence level (the product of the token ratios)
# Each returns detached weights [B, T] that multiply the per-token policy loss.

IS_CORRECTIONS: Registry = Registry("importance-sampling correction")


def _mismatch_log_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask > 0, old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs)).detach()


def _seq_log_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log rho_b on every token of row b: [B, T]."""
    log_rho = _mismatch_log_ratio(old_logprobs, behaviour_logprobs, mask)
    return log_rho.sum(-1, keepdim=True).expand_as(log_rho)


@IS_CORRECTIONS.register("none")
def no_correction(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    return torch.ones_like(old_logprobs)


@IS_CORRECTIONS.register("token-truncate")
def token_truncate(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Truncated IS (TIS): w_t = min(rho_t, C)."""
    return torch.clamp(torch.exp(_mismatch_log_ratio(old_logprobs, behaviour_logprobs, mask)), max=cap)


@IS_CORRECTIONS.register("token-mask")
def token_mask(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Masked IS (MIS): w_t = rho_t where 1/C <= rho_t <= C, else 0 (the token leaves the loss)."""
    rho = torch.exp(_mismatch_log_ratio(old_logprobs, behaviour_logprobs, mask))
    return torch.where((rho <= cap) & (rho >= 1.0 / cap), rho, torch.zeros_like(rho))


@IS_CORRECTIONS.register("seq-truncate")
def seq_truncate(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Sequence-level TIS: every token of row b weighted min(rho_b, C)."""
    return torch.exp(torch.clamp(_seq_log_ratio(old_logprobs, behaviour_logprobs, mask), max=math.log(cap)))


@IS_CORRECTIONS.register("seq-mask")
def seq_mask(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Sequence-level MIS: row b weighted rho_b where 1/C <= rho_b <= C, else left out whole."""
    log_rho = _seq_log_ratio(old_logprobs, behaviour_logprobs, mask)
    keep = log_rho.abs() <= math.log(cap)
    zero = torch.zeros_like(log_rho)
    return torch.where(keep, torch.exp(torch.where(keep, log_rho, zero)), zero)  # exp only where kept: no inf


# --- SFT token weights ---------------------------------------------------------------------------------------------

SFT_WEIGHTS: Registry = Registry("SFT token weight")


@SFT_WEIGHTS.register("nll")
def uniform_weight(logprobs: Tensor) -> Tensor:
    """Plain NLL: every expert token weighs 1."""
    return torch.ones_like(logprobs)


@SFT_WEIGHTS.register("phi")
def phi_weight(logprobs: Tensor) -> Tensor:
    """phi(p) = p * (1 - p) with p = exp(logprobs) detached (CHORD, Zhang et al. 2025, eq. 7): down-weights tokens the
    policy already knows (p near 1) or finds very unlikely (p near 0)."""
    p = logprobs.detach().exp()
    return p * (1.0 - p)


# --- the losses ----------------------------------------------------------------------------------------------------


def rl_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    spec: LossSpec,
    *,
    ref_logprobs: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    n_tokens: Tensor | float | None = None,
    n_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The RL term:

        pg_loss = POLICY_LOSSES[spec.policy_loss](logprobs, old_logprobs, A)           # [B, T]
        pg_loss = pg_loss * IS_CORRECTIONS[spec.is_correction](old, behaviour)         # with behaviour_logprobs
        pg_loss = pg_loss + kl_coef * KL_ESTIMATORS[spec.kl_estimator](logprobs, ref)  # with ref_logprobs
        loss    = AGGREGATIONS[spec.agg](pg_loss)

    Metrics are token means whatever the aggregation: clip_frac, dual_clip_frac, ratio, kl (k3 estimate of
    KL(old || current), from tokens the old policy sampled), ref_kl (with a reference), and the mismatch between
    behaviour and proximal policies (with behaviour_logprobs): mismatch_kl (k3 of KL(behaviour || proximal)),
    is_ratio (mean rho_t), is_weight (mean weight applied), is_ratio_outside (share of tokens with rho_t outside
    [1/C, C]), is_seq_outside (share of tokens whose row's rho_b is outside [1/C, C]).

    logprobs, old_logprobs, mask, ref_logprobs, behaviour_logprobs: [B, T]; advantages: [B] (one per sequence,
    GRPO) or [B, T] (GAE).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)  # [B, T]
    pg_loss, stats = POLICY_LOSSES[spec.policy_loss](logprobs, old_logprobs, advantages, mask, spec)
    metrics = {}
    if behaviour_logprobs is not None:
        weight = IS_CORRECTIONS[spec.is_correction](old_logprobs, behaviour_logprobs, mask, cap=spec.is_cap)
        pg_loss = pg_loss * weight
        with torch.no_grad():
            log_rho = _mismatch_log_ratio(old_logprobs, behaviour_logprobs, mask)
            outside = log_rho.abs() > math.log(spec.is_cap)
            seq_outside = _seq_log_ratio(old_logprobs, behaviour_logprobs, mask).abs() > math.log(spec.is_cap)
            metrics.update(
                # rho = p / mu over tokens drawn from mu: E_mu[(rho - 1) - log rho] = KL(mu || p)
                mismatch_kl=_token_mean(torch.exp(log_rho) - 1.0 - log_rho, mask, n_tokens),
                is_ratio=_token_mean(torch.exp(log_rho), mask, n_tokens),
                is_weight=_token_mean(weight, mask, n_tokens),
                is_ratio_outside=_token_mean(outside.to(mask.dtype), mask, n_tokens),
                is_seq_outside=_token_mean(seq_outside.to(mask.dtype), mask, n_tokens))
    if ref_logprobs is not None:
        ref_kl = KL_ESTIMATORS[spec.kl_estimator](ref_log_ratio(logprobs, ref_logprobs, mask))
        if spec.kl_coef:
            pg_loss = pg_loss + spec.kl_coef * ref_kl
        metrics["ref_kl"] = _token_mean(ref_kl.detach(), mask, n_tokens)
    loss = AGGREGATIONS[spec.agg](pg_loss, mask, n_tokens=n_tokens, n_seqs=n_seqs, norm=spec.agg_norm)
    with torch.no_grad():
        # k3 estimator of KL(old || current) from tokens sampled by the old policy q: with r = p / q,
        # E_q[(r - 1) - log r] = KL(q || p) (Schulman, "Approximating KL divergence").
        log_ratio = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))
        metrics.update(
            clip_frac=_token_mean(stats["clipped"].to(mask.dtype), mask, n_tokens),
            dual_clip_frac=_token_mean(stats["dual_clipped"].to(mask.dtype), mask, n_tokens),
            ratio=_token_mean(stats["ratio"], mask, n_tokens),
            kl=_token_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask, n_tokens))
    return loss, metrics


def sft_loss(logprobs: Tensor, mask: Tensor, spec: LossSpec, *,
             n_tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of expert tokens, each weighted by ``SFT_WEIGHTS[spec.sft_weight]``, token mean
    (CHORD, eq. 3). The ``nll`` metric is the unweighted mean. logprobs, mask: [B, T]."""
    weight = SFT_WEIGHTS[spec.sft_weight](logprobs)  # [B, T], no gradient
    loss = _token_mean(-logprobs * weight, mask, n_tokens)
    return loss, {"nll": _token_mean(-logprobs.detach(), mask, n_tokens)}


def chord_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    is_expert: Tensor,
    spec: LossSpec,
    *,
    mu: float,
    ref_logprobs: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    n_rl_tokens: Tensor | float | None = None,
    n_rl_seqs: Tensor | float | None = None,
    n_sft_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CHORD mixed loss (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts", eq. 5):

        loss = (1 - mu) * L_rl(on-policy rows) + mu * L_sft(expert rows)

    Each term is averaged over its own rows only (never over the mixed batch), so ``expert_ratio`` changes
    which rows are present, not the scale of either term. The aggregation, KL penalty and IS correction apply to the
    RL term (:func:`rl_loss`); the SFT term is always a token mean (:func:`sft_loss`).

    logprobs, old_logprobs, mask, ref_logprobs, behaviour_logprobs: [B, T]; advantages: [B] or [B, T];
    is_expert: [B] bool.
    """
    expert = is_expert.to(mask.dtype).unsqueeze(-1)  # [B, 1]
    rl_mask = mask * (1.0 - expert)  # [B, T]
    sft_mask = mask * expert
    l_rl, rl_metrics = rl_loss(logprobs, old_logprobs, advantages, rl_mask, spec, ref_logprobs=ref_logprobs,
                               behaviour_logprobs=behaviour_logprobs, n_tokens=n_rl_tokens, n_seqs=n_rl_seqs)
    l_sft, sft_metrics = sft_loss(logprobs, sft_mask, spec, n_tokens=n_sft_tokens)
    loss = (1.0 - mu) * l_rl + mu * l_sft
    metrics = {"loss": loss.detach(), "rl_loss": l_rl.detach(), "sft_loss": l_sft.detach()}
    metrics.update(rl_metrics)
    metrics["sft_nll"] = sft_metrics["nll"]
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = None,
    agg: str = "token-mean",
    n_tokens: Tensor | float | None = None,
    n_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss, with PPO's value clipping (as in OpenAI baselines' ppo2):

        l1 = (V - R)^2
        l2 = (V_old + clip(V - V_old, -eps, eps) - R)^2        # only with clip_eps
        loss = 0.5 * agg(max(l1, l2))

    values, old_values, returns, mask: [B, T].
    """
    keep = mask > 0  # positions outside the mask give 0, whatever they hold (inf * 0 would be nan)
    values = torch.where(keep, values, torch.zeros_like(values))
    old_values = torch.where(keep, old_values, torch.zeros_like(old_values))
    returns = torch.where(keep, returns, torch.zeros_like(returns))
    l1 = (values - returns) ** 2
    per_token = l1
    clipped = torch.zeros_like(l1)
    if clip_eps is not None:
        delta = values - old_values
        # inside the range keep ``values`` itself: old + (values - old) can differ from values by a rounding error,
        # which would count a token as clipped by noise alone
        v_clip = torch.where(delta.abs() > clip_eps, old_values + torch.clamp(delta, -clip_eps, clip_eps), values)
        l2 = (v_clip - returns) ** 2
        per_token = torch.maximum(l1, l2)
        clipped = (l2 > l1).to(l1.dtype)
    loss = 0.5 * AGGREGATIONS[agg](per_token, mask, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        metrics = {"value_loss": loss.detach(), "value_clip_frac": _token_mean(clipped.detach(), mask, n_tokens),
                   "value_mean": _token_mean(values.detach(), mask, n_tokens),
                   # what a critic predicting 0 everywhere would lose on these returns: the yardstick of value_loss
                   "value_zero_loss": 0.5 * AGGREGATIONS[agg](returns.detach() ** 2, mask, n_tokens=n_tokens,
                                                                n_seqs=n_seqs)}
    return loss, metrics
