"""Advantage estimators as pure functions of tensors, registered by name (``algo.advantage``).

An estimator maps one step's on-policy rows to per-token advantages (and, with a critic, the critic's regression
targets): ``fn(rewards [B], mask [B, T], spec, *, values, token_rewards) -> (advantages [B, T], returns [B, T] | None)``
with ``rewards`` the sequence scores, rows prompt-major in groups of ``spec.group_size`` (one prompt's samples
contiguous), ``mask`` 1 on each row's response tokens (left-aligned), ``values`` the critic's [B, T] (estimators marked
:func:`uses_critic` only) and ``token_rewards`` per-token rewards added to the score (the KL penalty with
``algo.kl_penalty: reward``), or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from learners.registry import Registry


@dataclass(frozen=True)
class AdvantageSpec:
    """The estimators' hyperparameters, from ``algo`` (actors/config.py: ``advantage_spec``)."""

    group_size: int  # samples per prompt (rollout.n)
    std_normalize: bool = True  # grpo: divide by the group's std (False: Dr. GRPO)
    gamma: float = 1.0  # gae: discount
    lam: float = 0.95  # gae: lambda
    whiten_rewards: bool = False  # gae: the step's scores to mean 0, std 1 first
    whiten_advantages: bool = True  # gae: advantages to mean 0, std 1 over the step's tokens


ADVANTAGES: Registry = Registry("advantage estimator")


def uses_critic(fn):
    """Mark an estimator that needs the critic's values (the run then starts a critic group)."""
    fn.uses_critic = True
    return fn


def needs_critic(name: str) -> bool:
    return getattr(ADVANTAGES[name], "uses_critic", False)


def _sequence_rewards(rewards: Tensor, token_rewards: Tensor | None, mask: Tensor) -> Tensor:
    """Each row's score plus the sum of its token rewards: [B]."""
    rewards = rewards.float()
    if token_rewards is not None:
        rewards = rewards + (token_rewards * mask).sum(-1)
    return rewards


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, mask: Tensor, spec: AdvantageSpec, *, values: Tensor | None = None,
         token_rewards: Tensor | None = None) -> tuple[Tensor, None]:
    """GRPO's group-normalised advantage (:func:`grpo_advantages`) of each row's total reward, on every token."""
    adv = grpo_advantages(_sequence_rewards(rewards, token_rewards, mask), spec.group_size,
                          std_normalize=spec.std_normalize)
    return adv.unsqueeze(-1) * mask, None


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, mask: Tensor, spec: AdvantageSpec, *, values: Tensor | None = None,
         token_rewards: Tensor | None = None) -> tuple[Tensor, None]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 5): each sample's baseline is the mean reward of the other
    G - 1 samples of its prompt, A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r_group)). Needs G >= 2."""
    G = spec.group_size
    if G < 2:
        raise ValueError("rloo needs at least 2 samples per prompt (rollout.n)")
    r = _sequence_rewards(rewards, token_rewards, mask).view(-1, G)  # [N, G]
    baseline = (r.sum(1, keepdim=True) - r) / (G - 1)  # the other samples' mean
    return (r - baseline).reshape(-1).unsqueeze(-1) * mask, None


@ADVANTAGES.register("gae")
@uses_critic
def gae_estimator(rewards: Tensor, mask: Tensor, spec: AdvantageSpec, *, values: Tensor | None = None,
                  token_rewards: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PPO with a critic: the score on each row's last token (whitened over the step first with
    ``whiten_rewards``), token rewards added, then :func:`gae`; advantages whitened over the step's tokens with
    ``whiten_advantages``."""
    r = whiten(rewards.float()) if spec.whiten_rewards and len(rewards) > 1 else rewards.float()
    lengths = mask.sum(-1).long().tolist()
    per_token = final_token_rewards(r, lengths, mask.shape[1])
    if token_rewards is not None:
        per_token = per_token + token_rewards * mask
    adv, returns = gae(per_token, values, mask, gamma=spec.gamma, lam=spec.lam)
    if spec.whiten_advantages and mask.sum() > 1:
        adv = whiten(adv, mask)
    return adv, returns


def grpo_advantages(rewards: Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, sec. 4.1.2):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     # std_normalize=True
        A_i =  r_i - mean(r_group)                             # std_normalize=False (Dr. GRPO, Liu et al. 2025)

    ``rewards``: [N * G], the G samples of each prompt contiguous. ``std`` is the unbiased sample standard
    deviation (as torch.std, TRL and verl). A group whose rewards are all equal gets advantage 0.
    Returns [N * G].
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [N, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0: the episode ends there)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the critic's regression target)

    rewards, values, mask: [B, T], each row's tokens left-aligned (mask = 1 on positions 0..T_b - 1, then 0);
    chorus puts the sequence reward on a row's last token and 0 elsewhere. Returns (advantages, returns), [B, T],
    0 where mask is 0. Vectorised over rows; one pass over T from the end.
    """
    mask = mask.to(values.dtype)
    values = torch.where(mask > 0, values, torch.zeros_like(values))  # nan/inf in padding must not leak in
    rewards = torch.where(mask > 0, rewards, torch.zeros_like(rewards))
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def final_token_rewards(rewards: Tensor, lengths: list[int], width: int) -> Tensor:
    """[B] sequence rewards -> [B, width] token rewards: each on its row's last token (row b has lengths[b] tokens)."""
    out = torch.zeros(len(lengths), width, dtype=rewards.dtype)
    for b, n in enumerate(lengths):
        if n:
            out[b, n - 1] = rewards[b]
    return out


def whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the positions where ``mask`` is 1 (all positions without a mask); with ``shift_mean``
    False the mean is added back (only the scale changes). ``std`` is the unbiased sample standard deviation.
    Positions outside the mask are returned as 0."""
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n == 0:
        return torch.zeros_like(x)
    x = torch.where(mask > 0, x, torch.zeros_like(x))  # a non-finite value outside the mask must not leak in
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / torch.clamp(n - 1, min=1.0)
    out = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def overlong_penalty(lengths: Tensor, *, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward of each response of ``lengths``
    tokens [B], with L_max = ``max_len`` (the generation budget) and L_cache = ``buffer``:

        R_len = 0                                    |y| <= L_max - L_cache
        R_len = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
        R_len = -1                                   |y| > L_max

    times ``factor``: a penalty growing linearly over the last L_cache tokens of the budget, so that a response
    running long loses reward before it is cut off. Returns [B] (float32, <= 0)."""
    lengths = lengths.float()
    soft = ((max_len - buffer) - lengths) / buffer
    return factor * torch.clamp(torch.where(lengths > max_len, torch.full_like(soft, -1.0), soft), min=-1.0, max=0.0)

