"""The reward actor: scores completions with the configured reward functions, all in parallel, under a timeout.

A function that raises, runs past ``timeout_s`` or returns NaN / None is counted under its name and its samples
get the configured fallback score; the step goes on. Each function runs in a process of its own
(:mod:`rewards.isolation`), killed and replaced when it hangs. A function that must run in this actor's process
(the LLM judge, which calls its engine actor through Ray) runs in a thread instead: one that hangs keeps its
thread, counted in ``hung_calls``. Either way a reward gets text with lone surrogates replaced by U+FFFD
(:func:`rewards.isolation.replace_surrogates`). Model-written code is run by the rewards that execute it, in the
sandbox.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from rewards.isolation import ProcessReward, RewardCallError, replace_surrogates
from rewards.registry import isolation, load
from rollout.types import Scored

if TYPE_CHECKING:  # the config's section is passed in; rewards/ does not import actors/
    from actors.config import RewardConfig

log = logging.getLogger("chorus.rewards")


def _finite(value) -> bool:
    if not isinstance(value, (int, float)):  # bool counts: True is 1.0
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class InThread:
    """A reward run in a thread of the reward actor, with :class:`ProcessReward`'s ``submit`` / ``result``. A call
    past its deadline is abandoned, but its thread runs on: counted in ``hung``."""

    def __init__(self, fn, pool: ThreadPoolExecutor):
        self.fn, self.pool, self.future, self.hung = fn, pool, None, 0

    def submit(self, prompts: list[str], responses: list[str], **fields) -> None:
        # the text a reward process would get (a tokenizer refuses a lone surrogate, as msgpack does)
        prompts, responses, fields = replace_surrogates((prompts, responses, fields))
        self.future = self.pool.submit(self.fn, prompts, responses, **fields)

    def result(self, timeout: float) -> list:
        try:
            return self.future.result(timeout=timeout)
        except FutureTimeout:
            if self.future.done():  # the reward's own TimeoutError (the same class on 3.11), not a hang
                raise
            self.hung += 1
            raise RewardCallError("was still scoring after its deadline; its thread was left to finish") from None

    def close(self) -> None:
        if hasattr(self.fn, "close"):
            self.fn.close()


class RewardActor:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.pool = ThreadPoolExecutor(max_workers=max(4, len(cfg.functions)), thread_name_prefix="reward")
        self.functions: list[tuple[str, float, ProcessReward | InThread]] = []  # each built once
        try:
            for f in cfg.functions:
                if isolation(f.name, f.isolation) == "process":
                    self.functions.append((f.name, f.weight, ProcessReward(f.name, dict(f.args))))
                else:
                    self.functions.append((f.name, f.weight, InThread(load(f.name, dict(f.args)), self.pool)))
            for name, _, fn in self.functions:  # the processes load in parallel; a load error fails the start here
                if isinstance(fn, ProcessReward):
                    try:
                        fn.await_ready()
                    except RewardCallError as exc:
                        raise RewardCallError(f"reward '{name}' {exc}") from None
        except BaseException:
            self.shutdown()
            raise

    @property
    def hung_calls(self) -> int:
        """Calls abandoned at the timeout whose thread still runs (thread isolation only)."""
        return sum(fn.hung for _, _, fn in self.functions if isinstance(fn, InThread))

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> tuple[list[Scored], float]:
        """Score each (prompt, response) pair; ``rows`` are the data rows (reference fields). Returns the scores
        and the seconds taken."""
        start = time.perf_counter()
        fields = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        fields.pop("prompt", None)
        fields.pop("response", None)  # a data column of that name must not stand in for the model's response
        results = [Scored(total=0.0) for _ in responses]
        submitted = {}  # every function starts before any is waited for
        for name, _, fn in self.functions:
            try:
                fn.submit(prompts, responses, **fields)
                submitted[name] = None
            except Exception as exc:  # a replacement process that failed to load: this batch fails
                submitted[name] = exc
        deadline = time.perf_counter() + self.cfg.timeout_s  # after any wait for a replacement process to load
        for name, weight, fn in self.functions:
            try:
                if submitted[name] is not None:
                    raise submitted[name]
                scores = fn.result(timeout=max(0.0, deadline - time.perf_counter()))
                if len(scores) != len(responses):
                    raise ValueError(f"returned {len(scores)} scores for {len(responses)} responses")
            except Exception as exc:  # a user's reward may raise anything: count it, never crash the run
                what = str(exc) if isinstance(exc, RewardCallError) else f"raised {type(exc).__name__}: {exc}"
                log.warning("reward '%s' %s (%d rows, first prompt %r)", name, what, len(prompts),
                            prompts[0][:80] if prompts else "")
                scores = [None] * len(responses)
            for i, s in enumerate(scores):
                if isinstance(s, Mapping):  # named components beside the reward's own "score"
                    parts, s = s, s.get("score")
                    for part, value in parts.items():
                        if part != "score" and _finite(value):
                            results[i].components[f"{name}.{part}"] = float(value)
                if not _finite(s):
                    results[i].failed.append(name)
                    s = self.cfg.fallback
                results[i].components[name] = float(s)
                results[i].total += weight * float(s)
        return results, time.perf_counter() - start

    def shutdown(self) -> None:
        """Stop the reward processes, and whatever a reward class holds (its ``close()``: the judge's engine)."""
        for name, _, fn in self.functions:
            try:
                fn.close()
            except Exception as exc:  # noqa: BLE001  (the others must still be closed)
                log.warning("reward '%s': close failed: %s", name, exc)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> int:
        """The process id: a new one after Ray restarts the actor."""
        return os.getpid()
