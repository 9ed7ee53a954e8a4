"""The records a training step passes between the driver's parts: its plan and its scored rollouts. They live here,
below the scheduler, the driver and the checkpoint code, so each can import them without a cycle. Rollouts leave the
process as msgpack in an async-mode checkpoint (model output: never pickle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgpack
import torch

from rollout.types import Completion, Scored


@dataclass
class StepPlan:
    step: int
    prompt_ids: list[int]  # rows of the prompt set; each is sampled n times
    expert_ids: list[int]  # rows of the expert set
    mu: float


@dataclass
class Rollouts:
    """One step's on-policy rows, scored: what the engines hand the learners."""

    plan: StepPlan
    rows: list[tuple[list[int], Completion]]  # (prompt ids, completion), prompt-major, rollout.n per prompt
    rewards: torch.Tensor  # [len(rows)] weighted totals
    scored: list[Scored]
    version: int  # the policy version (optimiser steps taken) that generated them
    phase: dict[str, float]  # generate / reward seconds
    dropped: list[int] = field(default_factory=list)  # prompt-set rows whose group a failed reward dropped
    # algo.dynamic_sampling: groups left out because their rewards were all equal, and the generation rounds taken
    filtered: int = 0
    rounds: int = 1
    reward_mean: float | None = None  # over every row sampled this step, filtered groups included (None: no rows)
    reward_components: dict[str, float] = field(default_factory=dict)  # each component's mean over the same rows


def component_means(scored: list[Scored]) -> dict[str, float]:
    """Each reward component's mean over the rows that have it (a failed row lacks its function's sub-components)."""
    out = {}
    for name in dict.fromkeys(k for s in scored for k in s.components):
        values = [s.components[name] for s in scored if name in s.components]
        out[name] = sum(values) / len(values)
    return out


def pack_rollouts(items: list[Rollouts]) -> bytes:
    return msgpack.packb([
        {"plan": asdict(r.plan), "rows": [[p, asdict(c)] for p, c in r.rows], "rewards": r.rewards.tolist(),
         "scored": [asdict(s) for s in r.scored], "version": r.version, "phase": r.phase, "dropped": r.dropped,
         "filtered": r.filtered, "rounds": r.rounds, "reward_mean": r.reward_mean,
         "reward_components": r.reward_components}
        for r in items], use_bin_type=True)


def unpack_rollouts(data: bytes) -> list[Rollouts]:
    out = []
    for d in msgpack.unpackb(data, raw=False):
        rewards = torch.tensor(d["rewards"], dtype=torch.float32)
        scored = [Scored(**s) for s in d["scored"]]
        out.append(Rollouts(
            plan=StepPlan(**d["plan"]), rows=[(p, Completion(**c)) for p, c in d["rows"]], rewards=rewards,
            scored=scored, version=d["version"], phase=d["phase"], dropped=d["dropped"],
            # written before dynamic sampling existed: every sampled row is in `rewards`
            filtered=d.get("filtered", 0), rounds=d.get("rounds", 1),
            reward_mean=d.get("reward_mean", float(rewards.mean()) if len(rewards) else None),
            reward_components=d.get("reward_components") or component_means(scored)))
    return out
