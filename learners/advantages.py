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
