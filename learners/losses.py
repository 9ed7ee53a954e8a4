"""Policy losses as pure functions of tensors.

Every function returns ``(loss, metrics)``: ``loss`` is a scalar tensor with a graph, ``metrics`` a dict of
detached scalar tensors (no ``.item()`` here: the learner reduces them once per step).

Shapes: ``B`` rows, ``T`` response positions. ``mask`` is 1.0 on tokens that count (response tokens of the
row), 0.0 on prompt and padding. Token means are ``sum(x * mask) / n_tokens``; ``n_tokens`` defaults to
``mask.sum()`` but the learner passes the token count of the whole global batch, so that a batch split across
data-parallel ranks or micro-batches sums to exactly the loss of the unsplit batch.
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


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,
    dual_clip: float | None = None,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss, token-mean (Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3).

        ratio    = exp(logprobs - old_logprobs)                        # [B, T]
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - eps, 1 + eps)
        pg_loss  = max(pg_loss1, pg_loss2)
        dual clip (Ye et al. 2020), for A < 0 only:  pg_loss = min(pg_loss, -A * c)

    logprobs, old_logprobs, mask: [B, T]; advantages: [B] (one per sequence, as in GRPO) or [B, T].
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
    loss = _token_mean(pg_loss, mask, n_tokens)
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
    n_rl_tokens: Tensor | float | None = None,
    n_sft_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CHORD mixed loss (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts", eq. 5):

        loss = (1 - mu) * L_rl(on-policy rows) + mu * L_sft(expert rows)

    Each term is a token-mean over its own rows only (never over the mixed batch), so ``expert_ratio`` changes
    which rows are present, not the scale of either term.

    logprobs, old_logprobs, mask: [B, T]; advantages: [B]; is_expert: [B] bool.
    """
    expert = is_expert.to(mask.dtype).unsqueeze(-1)  # [B, 1]
    rl_mask = mask * (1.0 - expert)  # [B, T]
    sft_mask = mask * expert
    l_rl, rl_metrics = ppo_clip_loss(
        logprobs, old_logprobs, advantages, rl_mask, clip_eps=clip_eps, dual_clip=dual_clip, n_tokens=n_rl_tokens
    )
    l_sft, sft_metrics = sft_loss(logprobs, sft_mask, phi=phi, n_tokens=n_sft_tokens)
    loss = (1.0 - mu) * l_rl + mu * l_sft
    metrics = {"loss": loss.detach(), "rl_loss": l_rl.detach(), "sft_loss": l_sft.detach()}
    metrics.update(rl_metrics)
    metrics["sft_nll"] = sft_metrics["nll"]
    return loss, metrics
