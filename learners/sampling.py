"""Log-probabilities under the distribution a token was actually sampled from (temperature, then top-p).

The engines (rollout/engine.py) sample from softmax(logits / temperature) truncated to the top-p nucleus and
report the sampled token's log-probability under that distribution; the learner recomputes the same quantity from
its own logits with ``sampling_logprobs`` so that the PPO ratio compares like with like. Pure torch: importable
without ray, vllm or deepspeed (convention 7).
"""

from __future__ import annotations

import torch
from torch import Tensor


def nucleus_mask(scaled_logits: Tensor, top_p: float) -> Tensor:
    """Which entries of ``scaled_logits`` [..., V] lie outside the top-p nucleus: a bool [..., V], True = removed.

    The nucleus is defined exactly as the engines define it, so that engine and learner truncate the same tokens:
    sort ascending, c_j = cumulative softmax mass of the j smallest-or-equal entries, remove j where
    c_j <= 1 - top_p, never remove the largest entry. Equivalently, in descending order a token is kept iff the mass
    strictly above it is < top_p: the boundary token, the one whose own mass carries the running total to >= top_p,
    is KEPT (the smallest set with mass >= top_p). A token whose mass above is exactly top_p is removed.
    Same as transformers' ``TopPLogitsWarper`` (generation/logits_process.py) and vLLM v1's
    ``apply_top_k_top_p_pytorch`` (v1/sample/ops/topk_topp_sampler.py). Ties at the boundary are broken by
    ``torch.sort`` order, as in both engines.

    1 - top_p is computed in float32 from a float32 top_p, as vLLM does with its per-request ``p`` tensor
    (transformers rounds the float64 ``1 - top_p`` to float32 instead: the two thresholds differ by ~2e-8 at
    top_p = 0.9, which moves the boundary only if a cumulative mass falls in between).
    """
    sorted_logits, order = scaled_logits.sort(dim=-1, descending=False)  # [..., V] ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., V], c_j
    threshold = 1 - torch.tensor(top_p, dtype=torch.float32, device=scaled_logits.device)
    remove_sorted = cumulative <= threshold
    remove_sorted[..., -1] = False  # the most likely token is always kept ("at least one" in both engines)
    return remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order


def sampling_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float, top_p: float,
                      mask: Tensor | None = None) -> Tensor:
    """log pi(tokens[b, t]) under the sampling distribution: [B, T, V], [B, T] -> [B, T] (float32).

        z = logits / temperature
        N = top-p nucleus of softmax(z) (``nucleus_mask``: the boundary token is kept)
        pi(a) = exp(z_a) / sum_{a' in N} exp(z_a')  for a in N,  0 (log = -inf) outside N

    which is what vLLM's ``logprobs_mode="processed_logprobs"`` and transformers' processed scores give for the
    sampled token. temperature = 1 and top_p = 1 is exactly ``learners.losses.token_logprobs`` (the same float32
    log_softmax, no division, no mask).

    The token asked about always counts as kept: N is N(z) united with {tokens[b, t]}. A token the engine sampled is
    inside the engine's nucleus, but the learner's logits differ from the engine's by rounding (more in bfloat16)
    and the policy moves between sampling and training, so a boundary token can fall just outside the learner's
    nucleus. Its log-probability would be -inf: the PPO ratio 0 and the KL estimates infinite (a NaN gradient).
    Kept, it is renormalised with its own mass added, which differs from the engine's by at most that mass.

    The nucleus is a selection, not a function with a useful gradient: it is computed on detached logits and
    applied as a mask. The gradient flows through the kept logits only (those outside N get zero).

    Finding the nucleus sorts the vocabulary at each position: several [B, T, V] tensors. With ``mask`` ([B, T], the
    positions whose log-probability is used) it is found at those positions only, so a learner's prompt positions
    cost nothing; elsewhere the result is the tempered log-probability without the nucleus.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (greedy has no sampling distribution), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    z = logits.float()  # [B, T, V]
    if temperature != 1.0:
        z = z / temperature  # float32 division, as both engines do it
    if top_p == 1.0:
        return torch.gather(z.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    where = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask > 0  # [B, T]
    zs, ts = z[where], tokens[where]  # [N, V], [N]: the positions asked about
    removed = nucleus_mask(zs.detach(), top_p).scatter(-1, ts.unsqueeze(-1), False)  # [N, V]
    picked = torch.gather(zs.masked_fill(removed, float("-inf")).log_softmax(-1), -1, ts.unsqueeze(-1)).squeeze(-1)
    if mask is None:
        return picked.view(tokens.shape)
    out = torch.gather(z.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T] tempered, no nucleus
    return out.masked_scatter(where, picked)
