"""The reward actor: scores completions with the configured reward functions, each under a timeout.

A function that raises, runs past ``timeout_s`` or returns NaN / None is counted under its name and its samples
get the configured fallback score; the step goes on. (A function that hangs keeps its thread busy: process-level
isolation of untrusted reward code is the sandbox's job, not this actor's.)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from actors.config import RewardConfig
from rewards.registry import load
from rollout.types import Scored

log = logging.getLogger("chorus.rewards")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)  # bool counts: True is 1.0


class RewardActor:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.functions = [(f.name, f.weight, load(f.name, dict(f.args))) for f in cfg.functions]  # built once
        self.hung_calls = 0  # calls abandoned at the timeout; each still holds a thread of the pool
        self.pool = ThreadPoolExecutor(max_workers=max(4, len(self.functions)), thread_name_prefix="reward")

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> tuple[list[Scored], float]:
        """Score each (prompt, response) pair; ``rows`` are the data rows (reference fields). Returns the scores
        and the seconds taken."""
        start = time.perf_counter()
        fields = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        fields.pop("prompt", None)
        results = [Scored(total=0.0) for _ in responses]
        futures = [(name, weight, self.pool.submit(fn, prompts, responses, **fields))
                   for name, weight, fn in self.functions]
        deadline = start + self.cfg.timeout_s
        for name, weight, future in futures:
            try:
                scores = future.result(timeout=max(0.0, deadline - time.perf_counter()))
                if len(scores) != len(responses):
                    raise ValueError(f"returned {len(scores)} scores for {len(responses)} responses")
            except FutureTimeout:
                self.hung_calls += 1
                log.warning("reward '%s' timed out after %.1fs on %d rows (first prompt %r)",
                            name, self.cfg.timeout_s, len(prompts), prompts[0] if prompts else "")
                scores = [None] * len(responses)
            except Exception as exc:  # a user's reward may raise anything: count it, never crash the run
                log.warning("reward '%s' raised %s: %s (first prompt %r)", name, type(exc).__name__, exc,
                            prompts[0] if prompts else "")
                scores = [None] * len(responses)
            for i, s in enumerate(scores):
                if isinstance(s, Mapping):  # named components beside the reward's own "score"
                    parts, s = s, s.get("score")
                    for part, value in parts.items():
                        if part != "score" and _finite(value):
                            results[i].components[f"{name}.{part}"] = float(value)
                bad = not _finite(s)
                if bad:
                    results[i].failed.append(name)
                    s = self.cfg.fallback
                results[i].components[name] = float(s)
                results[i].total += weight * float(s)
        return results, time.perf_counter() - start

    def ready(self) -> int:
        """The process id: a new one after Ray restarts the actor."""
        return os.getpid()
