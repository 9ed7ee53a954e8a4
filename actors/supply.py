"""Where a training step's rollouts come from, behind one interface for the driver.

``RolloutSupply`` (synchronous, ``train.max_staleness`` 0): a step's rollouts are made when the step asks for them,
and engine work (weight loads, evaluations) runs inline. ``AsyncRolloutSupply`` (S > 0): one worker thread owns the
engines; it makes the rollouts of steps k+1..k+S while the learners train step k, and runs weight loads and
evaluations queued in order behind them, so a rollout trained on at step j was sampled from policy version j - S or
newer and an evaluation sees the newest weights the learners had when it was queued.

Both plan the steps (the scheduler's state before each planned step is kept for a checkpoint taken before it
trains) and hand a checkpoint the rollouts already made ahead.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from actors.records import Rollouts, StepPlan
from actors.scheduler import Scheduler


class RolloutSupply:
    """Synchronous: ``make(plan)`` runs when a step asks."""

    def __init__(self, scheduler: Scheduler, make: Callable[[StepPlan], Rollouts]):
        self.scheduler, self.make = scheduler, make
        self.plan_states: dict[int, dict] = {}  # step -> the scheduler's state before the step was planned
        self.planned = 0  # the next step to plan

    def _plan(self, step: int) -> StepPlan:
        self.plan_states[step] = self.scheduler.state()  # a checkpoint taken before `step` trains needs it
        self.planned = step + 1
        return self.scheduler.plan(step)

    def rollouts(self, step: int) -> tuple[Rollouts, float | None]:
        """Step ``step``'s scored rollouts, and the seconds the step waited for them (None: they were made now, a
        part of the step). Raises ``Interrupted`` when the run is stopping before they are made."""
        self._forget_before(step)
        return self.make(self._plan(step)), None

    def _forget_before(self, step: int) -> None:
        for old in [k for k in self.plan_states if k < step]:
            del self.plan_states[old]

    def load_weights(self, load: Callable[[str], None], path: str) -> None:
        """The engines take a new policy version: ``load(path)``, now."""
        load(path)

    def on_engines(self, fn, *args):
        """Run engine work (an evaluation) in order with the rest: now."""
        return fn(*args)

    def finish(self) -> None:
        """Every weight load done, none failed (before the final evaluation's result is trusted)."""

    def ahead(self, *, stopping: bool) -> list[Rollouts]:
        """The rollouts made for steps not trained yet, in step order (none: synchronous)."""
        return []

    def scheduler_state(self, plan_from: int) -> dict:
        """The scheduler's state before step ``plan_from`` was planned (now, if it was not)."""
        return self.plan_states[plan_from] if plan_from < self.planned else self.scheduler.state()

    def reset(self, *, planned: int, ahead: list[Rollouts] = (), scheduler: Scheduler | None = None) -> None:
        """After a restore: plan from step ``planned`` on, with the rollouts a checkpoint saved for the steps before
        it (async) and, after a restart from nothing, a fresh scheduler."""
        self.scheduler = scheduler or self.scheduler
        self.planned, self.plan_states = planned, {}

    def drain(self) -> None:
        """Drop the work made for a policy that is being rolled back."""

    def close(self) -> None:
        pass


class AsyncRolloutSupply(RolloutSupply):
    """Async mode: up to ``staleness`` steps of rollouts made ahead on the engine worker."""

    def __init__(self, scheduler: Scheduler, make: Callable[[StepPlan], Rollouts], *, staleness: int,
                 last_step: int):
        super().__init__(scheduler, make)
        self.staleness, self.last_step = staleness, last_step
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="chorus-engines")  # FIFO: the engines' order
        self.pending: deque[tuple[int, Future]] = deque()  # (step, its rollouts), made ahead
        self.loads: deque[Future] = deque()  # weight loads queued on the worker (checked: none is lost)

    def rollouts(self, step: int) -> tuple[Rollouts, float | None]:
        self._forget_before(step)
        while self.planned <= min(step + self.staleness, self.last_step):
            self.pending.append((self.planned, self.worker.submit(self.make, self._plan(self.planned))))
        t = time.perf_counter()
        planned, future = self.pending[0]
        assert planned == step, (planned, step)
        rollouts = future.result()  # raises Interrupted when stopping, before the step trains
        self.pending.popleft()
        while self.loads and self.loads[0].done():
            self.loads.popleft().result()  # raises what the load raised
        return rollouts, time.perf_counter() - t

    def load_weights(self, load: Callable[[str], None], path: str) -> None:
        self.loads.append(self.worker.submit(load, path))

    def on_engines(self, fn, *args):
        return self.worker.submit(fn, *args).result()

    def finish(self) -> None:
        for load in self.loads:
            load.result()

    def ahead(self, *, stopping: bool) -> list[Rollouts]:
        """Waited for; when stopping, those made before the stop (the rest are abandoned)."""
        ready = []
        for _, future in self.pending:  # in step order
            try:
                ready.append(future.result())
            except Exception:
                if not stopping:
                    raise
                break
        return ready

    def reset(self, *, planned: int, ahead: list[Rollouts] = (), scheduler: Scheduler | None = None) -> None:
        super().reset(planned=planned, scheduler=scheduler)
        self.pending = deque()
        for r in ahead:
            future: Future = Future()
            future.set_result(r)
            self.pending.append((r.plan.step, future))

    def drain(self) -> None:
        """Cancel the queued rollouts and weight loads and wait for the running ones."""
        futures = [f for _, f in self.pending] + list(self.loads)
        for f in futures:
            f.cancel()
        for f in futures:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - cancelled, or failed: discarded either way
                pass
        self.pending.clear()
        self.loads.clear()

    def close(self) -> None:
        """Its calls on actors fail once the actors are gone, and it ends."""
        self.worker.shutdown(wait=False, cancel_futures=True)
