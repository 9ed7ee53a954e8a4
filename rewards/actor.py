"""The reward actor: scores completions with the configured reward functions, all in parallel, under a timeout.

A function that raises, runs past ``timeout_s`` or returns NaN / None is counted under its name and its samples
get the configured fallback score; the step goes on. Each function runs in a process of its own
(:mod:`rewards.isolation`), killed and replaced when it hangs. A function that must run in this actor's process
(the LLM judge, which calls its engine actor through Ray) runs in a thread instead: one that hangs keeps its
thread, counted in ``hung_calls``. Model-written code is run by the rewards that execute it, in the sandbox.
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
from rewards.isolation import ProcessReward, RewardCallError
from rewards.registry import isolation, load
from rollout.types import Scored

log = logging.getLogger("chorus.rewards")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)  # bool counts: True is 1.0


class RewardActor:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.functions = []  # (name, weight, the callable: a ProcessReward, or the function itself)
        try:
            for f in cfg.functions:  # each built once
                own_process = (f.isolation or isolation(f.name)) == "process"
                fn = ProcessReward(f.name, dict(f.args)) if own_process else load(f.name, dict(f.args))
                self.functions.append((f.name, f.weight, fn))
            for _, _, fn in self.functions:  # the processes load in parallel; a load error fails the start here
                if isinstance(fn, ProcessReward):
                    fn.await_ready()
        except BaseException:
            self.shutdown()
            raise
        self.hung_calls = 0  # thread-run calls abandoned at the timeout; each still holds a thread of the pool
        self.pool = ThreadPoolExecutor(max_workers=max(4, len(self.functions)), thread_name_prefix="reward")

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> tuple[list[Scored], float]:
        """Score each (prompt, response) pair; ``rows`` are the data rows (reference fields). Returns the scores
        and the seconds taken."""
        start = time.perf_counter()
        fields = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        fields.pop("prompt", None)
        results = [Scored(total=0.0) for _ in responses]
        calls = []  # every function starts before any is waited for
        for name, weight, fn in self.functions:
            if isinstance(fn, ProcessReward):
                try:
                    fn.submit(prompts, responses, **fields)
                    call = fn
                except Exception as exc:  # its replacement process failed to load: fail this batch
                    call = exc
            else:
                call = self.pool.submit(fn, prompts, responses, **fields)
            calls.append((name, weight, call))
        deadline = time.perf_counter() + self.cfg.timeout_s  # after any wait for a replacement process to load
        for name, weight, call in calls:
            try:
                if isinstance(call, Exception):
                    raise call
                left = max(0.0, deadline - time.perf_counter())
                scores = call.result(timeout=left)
                if len(scores) != len(responses):
                    raise ValueError(f"returned {len(scores)} scores for {len(responses)} responses")
            except FutureTimeout:
                self.hung_calls += 1
                log.warning("reward '%s' timed out after %.1fs on %d rows (first prompt %r)",
                            name, self.cfg.timeout_s, len(prompts), prompts[0] if prompts else "")
                scores = [None] * len(responses)
            except Exception as exc:  # a user's reward may raise anything: count it, never crash the run
                what = str(exc) if isinstance(exc, RewardCallError) else f"raised {type(exc).__name__}: {exc}"
                log.warning("reward '%s' %s (first prompt %r)", name, what, prompts[0] if prompts else "")
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

    def shutdown(self) -> None:
        """Stop the reward processes, and whatever a reward class holds (its ``close()``: the judge's engine)."""
        for name, _, fn in self.functions:
            if hasattr(fn, "close"):
                try:
                    fn.close()
                except Exception as exc:  # noqa: BLE001  (the others must still be closed)
                    log.warning("reward '%s': close failed: %s", name, exc)
        if hasattr(self, "pool"):
            self.pool.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> int:
        """The process id: a new one after Ray restarts the actor."""
        return os.getpid()
