"""The scheduler: which prompts and expert rows make up step k, the CHORD weight mu(k), and which prompt groups
leave the step when a reward failed on them. No Ray here."""

from __future__ import annotations

from actors.config import AlgoConfig
from actors.records import StepPlan
from learners.schedules import MU_SCHEDULES
from rollout.data import Cursor
from rollout.types import Scored

def num_expert_rows(on_policy_rows: int, expert_ratio: float) -> int:
    """E = round(r * R / (1 - r)): the whole number of expert rows that makes E / (E + R) about ``expert_ratio``."""
    return round(expert_ratio * on_policy_rows / (1.0 - expert_ratio))


class Scheduler:
    def __init__(self, cfg: AlgoConfig, group_size: int, num_prompts: int, num_expert: int, seed: int):
        self.cfg = cfg
        self.num_expert = num_expert_rows(cfg.prompts_per_step * group_size, cfg.expert_ratio) if num_expert else 0
        self.prompts = Cursor(num_prompts, seed)
        self.expert = Cursor(max(num_expert, 1), seed + 1)

    def mu(self, step: int) -> float:
        c = self.cfg
        return MU_SCHEDULES[c.mu_schedule](step, mu_peak=c.mu_peak, mu_valley=c.mu_valley,
                     warmup_steps=c.mu_warmup_steps, hold_steps=c.mu_hold_steps, decay_steps=c.mu_decay_steps)

    def plan(self, step: int) -> StepPlan:
        mu = self.mu(step)
        # mu = 1 is pure SFT: the RL term has no weight, so generating rollouts would be wasted work.
        prompt_ids = self.prompts.take(self.cfg.prompts_per_step) if mu < 1.0 else []
        expert_ids = self.expert.take(self.num_expert) if mu > 0.0 else []
        return StepPlan(step=step, prompt_ids=prompt_ids, expert_ids=expert_ids, mu=mu)

    def state(self) -> dict:
        """The data cursors (a checkpoint's part of the scheduler: mu and the plan are functions of the step)."""
        return {"prompts": self.prompts.state(), "expert": self.expert.state()}

    def load_state(self, state: dict) -> None:
        self.prompts, self.expert = Cursor(**state["prompts"]), Cursor(**state["expert"])


def drop_failed_groups(scored: list[Scored], group_size: int) -> tuple[list[int], list[int]]:
    """``reward.on_failure = drop_group``: which rows stay in the step. Rows are prompt-major, group g being rows
    g*G .. g*G + G - 1 (one prompt's G samples); a group with a failed row leaves whole, so that GRPO normalises
    only over groups whose rewards are all real and the rows left are still contiguous groups of G.

    Returns (kept row indices, dropped group indices), both ascending.
    """
    if len(scored) % group_size:
        raise ValueError(f"{len(scored)} rows do not split into groups of {group_size}")
    dropped = [g for g in range(len(scored) // group_size)
               if any(s.failed for s in scored[g * group_size : (g + 1) * group_size])]
    gone = set(dropped)
    kept = [i for i in range(len(scored)) if i // group_size not in gone]
    return kept, dropped


def uniform_groups(scored: list[Scored], group_size: int, key=lambda s: s.total) -> list[int]:
    """``algo.dynamic_sampling``: the groups (rows g*G .. g*G + G - 1, one prompt's samples) whose rewards
    (``key(scored)``, the total by default) are all equal, all right or all wrong: their group-relative advantages are
    all 0, so they teach the policy nothing and only dilute the step (DAPO, Yu et al. 2025, sec. 3.2). Ascending."""
    if len(scored) % group_size:
        raise ValueError(f"{len(scored)} rows do not split into groups of {group_size}")
    return [g for g in range(len(scored) // group_size)
            if len({key(s) for s in scored[g * group_size : (g + 1) * group_size]}) == 1]

