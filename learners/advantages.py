"""Advantage estimators as pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor


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
