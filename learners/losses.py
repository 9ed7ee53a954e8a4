"""Policy losses as pure functions of tensors.

Every function returns ``(loss, metrics)``: ``loss`` is a scalar tensor with a graph, ``metrics`` a dict of
detached scalar tensors (no ``.item()`` here: the learner reduces them once per step).

Shapes: ``B`` rows, ``T`` response positions. ``mask`` is 1.0 on tokens that count (response tokens of the
row), 0.0 on prompt and padding. Token means are ``sum(x * mask) / n_tokens``; ``n_tokens`` defaults to
``mask.sum()`` but the learner passes the token count of the whole global batch, so that a batch split across
data-parallel ranks or micro-batches sums to exactly the loss of the unsplit batch. Sequence means divide by
``n_seqs`` (default: the rows with at least one counted token) for the same reason.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


# How a per-token loss becomes one number (the names verl uses):
#   token-mean           sum_{b,t} x / N_tokens                            every token weighs the same (DAPO)
#   seq-mean-token-mean  sum_b (sum_t x / T_b) / N_seqs                    every sequence weighs the same (GRPO paper)
#   seq-mean-token-sum   sum_b (sum_t x) / N_seqs                          long sequences weigh more (Dr. GRPO's
#                                                                         sum, divided by N_seqs, not a constant)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate(x: Tensor, mask: Tensor, agg: str = "token-mean", *, n_tokens: Tensor | float | None = None,
              n_seqs: Tensor | float | None = None) -> Tensor:
    """Reduce a per-token quantity ``x`` [B, T] over the positions where ``mask`` is 1, as ``agg`` says."""
    if agg == "token-mean":
        return _token_mean(x, mask, n_tokens)
    per_seq = (x * mask).sum(-1)  # [B]
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / torch.clamp(mask.sum(-1), min=1.0)
    elif agg != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGS}")
    n = (mask.sum(-1) > 0).sum() if n_seqs is None else n_seqs
    return per_seq.sum() / torch.clamp(torch.as_tensor(n, dtype=x.dtype, device=x.device), min=1.0)


KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(current || reference) from tokens sampled by the current policy
    (Schulman, "Approximating KL divergence"): with log r = ref_logprobs - logprobs,

        k1 = -log r                  unbiased, can be negative per token
        k3 = (r - 1) - log r         unbiased, never negative, lower variance (the GRPO paper's choice)

    Masked positions give 0. Both carry gradient through ``logprobs``; k3 is clamped at 10 per token (as verl) so one
    token the reference finds impossible cannot blow up the step. [B, T] -> [B, T].
    """
    log_r = torch.where(mask > 0, ref_logprobs - logprobs, torch.zeros_like(logprobs))
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.clamp(torch.exp(log_r) - 1.0 - log_r, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    n_tokens: Tensor | float | None = None,
    n_seqs: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss (Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3).

        ratio    = exp(logprobs - old_logprobs)                        # [B, T]
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - eps, 1 + eps)
        pg_loss  = max(pg_loss1, pg_loss2)
        dual clip (Ye et al. 2020), for A < 0 only:  pg_loss = min(pg_loss, -A * c)
        with a reference model:                      pg_loss = pg_loss + kl_coef * kl_penalty(logprobs, ref)

    then reduced by ``agg`` (see :func:`aggregate`). Metrics are token means whatever ``agg`` is.
    logprobs, old_logprobs, mask, ref_logprobs: [B, T]; advantages: [B] (one per sequence, GRPO) or [B, T] (GAE).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1], broadcast over T
    # Positions outside the mask get log_ratio 0, not their raw value: an expert token with log p = -100 would make
    # exp(-log_ratio) infinite, and inf * 0 is nan however well the mask is applied afterwards.
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B, T]
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)
    if dual_clip is not None:
        pg_loss3 = -advantages * dual_clip
        pg_loss = torch.where(advantages < 0, torch.minimum(pg_loss, pg_loss3), pg_loss)
    ref_kl = None
    if ref_logprobs is not None:
        ref_kl = kl_penalty(logprobs, ref_logprobs, mask, kl_estimator)
        if kl_coef:
            pg_loss = pg_loss + kl_coef * ref_kl
    loss = aggregate(pg_loss, mask, agg, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        clipped = (pg_loss2 > pg_loss1).float()
        # k3 estimator of KL(behaviour || current) from tokens sampled by the behaviour policy q: with
        # r = p / q = exp(log_ratio), E_q[(r - 1) - log r] = KL(q || p) (Schulman, "Approximating KL divergence").
        kl_k3 = torch.exp(log_ratio) - 1.0 - log_ratio
        metrics = {
            "clip_frac": _token_mean(clipped, mask, n_tokens),
            "ratio": _token_mean(ratio, mask, n_tokens),
            "kl": _token_mean(kl_k3, mask, n_tokens),
        }
        if ref_kl is not None:
            metrics["ref_kl"] = _token_mean(ref_kl, mask, n_tokens)
    return loss, metrics


def sft_loss(
    logprobs: Tensor,
    mask: Tensor,
    *,
    phi: bool = False,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of expert tokens, token-mean; with ``phi`` each token is weighted by
    ``phi(p) = p * (1 - p)`` with ``p = exp(logprobs)`` detached (CHORD, Zhang et al. 2025, eq. 7), which
    down-weights tokens the policy already knows (p near 1) or finds very unlikely (p near 0).

    logprobs, mask: [B, T].
    """
    nll = -logprobs  # [B, T]
    if phi:
        p = logprobs.detach().exp()
        nll = nll * p * (1.0 - p)
    loss = _token_mean(nll, mask, n_tokens)
    return loss, {"nll": _token_mean(-logprobs.detach(), mask, n_tokens)}


def chord_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    is_expert: Tensor,
    *,
    mu: float,
    clip_eps: float,
    dual_clip: float | None = None,
    phi: bool = False,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    n_rl_tokens: Tensor | float | None = None,
    n_rl_seqs: Tensor | float | None = None,
    n_sft_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CHORD mixed loss (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts", eq. 5):

        loss = (1 - mu) * L_rl(on-policy rows) + mu * L_sft(expert rows)

    Each term is averaged over its own rows only (never over the mixed batch), so ``expert_ratio`` changes
    which rows are present, not the scale of either term. ``agg`` and the KL penalty apply to the RL term; the SFT
    term is always a token mean (CHORD, eq. 3).

    logprobs, old_logprobs, mask, ref_logprobs: [B, T]; advantages: [B] or [B, T]; is_expert: [B] bool.
    """
    expert = is_expert.to(mask.dtype).unsqueeze(-1)  # [B, 1]
    rl_mask = mask * (1.0 - expert)  # [B, T]
    sft_mask = mask * expert
    l_rl, rl_metrics = ppo_clip_loss(
        logprobs, old_logprobs, advantages, rl_mask, clip_eps=clip_eps, dual_clip=dual_clip,
        ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator, agg=agg, n_tokens=n_rl_tokens,
        n_seqs=n_rl_seqs,
    )
    l_sft, sft_metrics = sft_loss(logprobs, sft_mask, phi=phi, n_tokens=n_sft_tokens)
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
    loss = 0.5 * aggregate(per_token, mask, agg, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        metrics = {"value_loss": loss.detach(), "value_clip_frac": _token_mean(clipped.detach(), mask, n_tokens),
                   "value_mean": _token_mean(values.detach(), mask, n_tokens),
                   # what a critic predicting 0 everywhere would lose on these returns: the yardstick of value_loss
                   "value_zero_loss": 0.5 * aggregate(returns.detach() ** 2, mask, agg, n_tokens=n_tokens,
                                                      n_seqs=n_seqs)}
    return loss, metrics
