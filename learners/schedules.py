"""Schedules of the CHORD weight mu, registered by name (``algo.mu_schedule``); pure functions of the step."""

from __future__ import annotations

import math

from learners.registry import Registry

# mu(step) of the CHORD loss, by ``algo.mu_schedule``: fn(step, *, mu_peak, mu_valley, warmup_steps, hold_steps,
# decay_steps) -> mu. Every schedule warms up linearly from 0 over W steps and holds mu_peak for H; they differ in
# how they decay over D steps to mu_valley.
MU_SCHEDULES: Registry = Registry("mu schedule")


def _warmup_hold(step: int, mu_peak: float, warmup_steps: int, hold_steps: int) -> tuple[float | None, int]:
    """(mu, 0) inside warmup or hold; (None, s) after them, s the steps into the decay."""
    if step < warmup_steps:
        return mu_peak * step / warmup_steps, 0
    s = step - warmup_steps
    if s < hold_steps:
        return mu_peak, 0
    return None, s - hold_steps


@MU_SCHEDULES.register("cosine")
def mu_at(step: int, *, mu_peak: float, mu_valley: float, warmup_steps: int, decay_steps: int,
          hold_steps: int = 0) -> float:
    """CHORD's mu schedule (as in the paper's public implementation in Trinity-RFT), with an optional hold H:

        step <  W:                  mu = mu_peak * step / W                                        (linear warmup)
        W <= step < W + H:          mu = mu_peak                                                   (hold)
        W + H <= step < W + H + D:  mu = mu_valley + (mu_peak - mu_valley) * (1 + cos(pi * s / D)) / 2,
                                    s = step - W - H                                               (cosine decay)
        step >= W + H + D:          mu = mu_valley

    With W = H = D = 0 mu is the constant mu_valley. SFT-then-RL is mu_peak 1, mu_valley 0, H = the SFT steps, D = 0.
    """
    mu, s = _warmup_hold(step, mu_peak, warmup_steps, hold_steps)
    if mu is not None:
        return mu
    if s < decay_steps:
        return mu_valley + (mu_peak - mu_valley) * 0.5 * (1.0 + math.cos(math.pi * s / decay_steps))
    return mu_valley


@MU_SCHEDULES.register("linear")
def mu_linear(step: int, *, mu_peak: float, mu_valley: float, warmup_steps: int, decay_steps: int,
              hold_steps: int = 0) -> float:
    """As ``cosine`` but a straight line down: mu = mu_peak - (mu_peak - mu_valley) * s / D during the decay."""
    mu, s = _warmup_hold(step, mu_peak, warmup_steps, hold_steps)
    if mu is not None:
        return mu
    if s < decay_steps:
        return mu_peak - (mu_peak - mu_valley) * s / decay_steps
    return mu_valley
