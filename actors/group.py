"""ActorGroup: N Ray actors of one role, their placement group, their env, and calls that survive a restart."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.internals import ray_actor_entry

log = logging.getLogger("chorus")


class Interrupted(Exception):
    """The group's ``interrupt`` event was set while :meth:`ActorGroup.map` waited (the run is stopping)."""


class GroupFailed(RuntimeError):
    """Collective work of a group (DeepSpeed ranks) failed: a rank died, or a call ran past ``deadline_s``. The
    group cannot go on (its process group is broken or stuck): the driver restarts it from a checkpoint."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role


class ActorGroup:
    """``size`` actors of ``cls``, one placement-group bundle each (``bundle``: e.g. {"CPU": 1, "GPU": 1}).

    ``make_kwargs(rank)`` gives each actor's constructor arguments. Actors that may be restarted by Ray
    (``max_restarts`` > 0) have calls that died with them retried by :meth:`map` up to ``retries`` times. A call
    running longer than ``deadline_s`` (0 = none) gets its actor killed and, like a death, restarted and retried.
    """

    def __init__(self, role: str, cls: type, size: int, bundle: dict[str, float],
                 make_kwargs: Callable[[int], dict], *, env: dict[str, str] | None = None,
                 strategy: str = "PACK", max_restarts: int = 0, retries: int = 0, ready_timeout_s: float = 600,
                 deadline_s: float = 0.0):
        self.role, self.cls, self.retries, self._pid_restarts, self._reported = role, cls, retries, 0, (0, 0)
        self.ready_timeout_s, self.deadline_s = ready_timeout_s, deadline_s
        self.deadlines = 0  # calls killed past their deadline
        self.interrupt: threading.Event | None = None  # set (by the driver) = stop waiting in map()
        bundle = {k: v for k, v in bundle.items() if v}
        self.actors: list = []
        self.pg = placement_group([dict(bundle)] * size, strategy=strategy, name=f"chorus-{role}")
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"{role}: the cluster cannot place {size} x {bundle} "
                               f"(resources: {ray.cluster_resources()})") from None
        try:
            self._start(cls, size, bundle, make_kwargs, env, max_restarts, ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, cls, size, bundle, make_kwargs, env, max_restarts, ready_timeout_s) -> None:
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env or {}},
            ).remote(**make_kwargs(i))
            for i in range(size)
        ]
        self.pids = ray.get([a.ready.remote() for a in self.actors], timeout=ready_timeout_s)

    def __len__(self) -> int:
        return len(self.actors)

    def all(self, call: Callable[[ActorHandle], ObjectRef]) -> list[Any]:
        """``call(actor)`` on every actor, e.g. ``group.all(lambda a: a.save_weights.remote(path))``; results in
        actor order. For collective work (learner ranks): no retry (see :meth:`get`)."""
        return self.get([call(a) for a in self.actors])

    def get(self, refs: list[ObjectRef]) -> list[Any]:
        """The results of collective work submitted to this group. A dead rank raises :class:`GroupFailed` at once
        (its peers would wait in a collective for it), and so does the work running past ``deadline_s``."""
        deadline = time.monotonic() + self.deadline_s if self.deadline_s else None
        waiting = list(refs)
        while waiting:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=timeout)
            if not ready:
                self.deadlines += 1
                raise GroupFailed(self.role, f"{self.role}: {len(waiting)} of {len(refs)} ranks were still working "
                                             f"after {self.role}.deadline_s = {self.deadline_s:g}s")
            try:
                ray.get(ready[0])
            except (RayActorError, ActorUnavailableError) as exc:
                raise GroupFailed(self.role, f"{self.role}: a rank died ({type(exc).__name__}: "
                                             f"{str(exc).splitlines()[0]})") from exc
        return ray.get(refs)

    def submit(self, call: Callable[[ActorHandle, Any], ObjectRef], shards: list) -> list[ObjectRef]:
        """``call(actor i, shards[i])`` on every actor, without waiting: collective work (one shard per rank, no
        retry) that the caller overlaps with another group's before ``ray.get``."""
        if len(shards) != len(self.actors):
            raise ValueError(f"{self.role}: {len(shards)} shards for {len(self.actors)} ranks")
        return [call(a, shard) for a, shard in zip(self.actors, shards)]

    def map(self, call: Callable[[ActorHandle, Any], ObjectRef], shards: list,
            on_pending: Callable[[int], None] | None = None, *, interruptible: bool = True) -> list[Any]:
        """``call(actor, shards[i])`` on actor ``i % size``; results in shard order. A shard whose actor died, or ran
        past ``deadline_s`` (its actor is then killed), is resubmitted once Ray has restarted the actor, up to
        ``retries`` times. Raises :class:`Interrupted` soon after ``interrupt`` is set, if ``interruptible``."""
        def submit(i: int) -> ObjectRef:
            started[i] = time.monotonic()
            return call(self.actors[i % len(self.actors)], shards[i])

        started: dict[int, float] = {}
        refs = {i: submit(i) for i in range(len(shards))}
        results: dict[int, Any] = {}
        attempts = dict.fromkeys(refs, 0)

        def retry(i: int, why: str, exc: BaseException | None = None) -> None:
            attempts[i] += 1
            k = i % len(self.actors)
            if attempts[i] > self.retries:
                raise RuntimeError(f"{self.role} actor {k} failed {attempts[i]} times on the same work; "
                                   f"last: {why}") from exc
            log.warning("%s actor %d: %s; retrying its work once it is back", self.role, k, why)
            self._wait_until_back(k)
            refs[i] = submit(i)

        while refs:
            if on_pending:
                on_pending(len(refs))
            if interruptible and self.interrupt is not None and self.interrupt.is_set():
                raise Interrupted(self.role)
            ready, _ = ray.wait(list(refs.values()), num_returns=1, timeout=1.0)
            if not ready:
                now = time.monotonic()
                late = [i for i in refs if self.deadline_s and now - started[i] > self.deadline_s]
                for i in late:
                    if i not in refs or now - started[i] <= self.deadline_s:  # resubmitted by an earlier kill
                        continue
                    k = i % len(self.actors)
                    if not self._alive(k):  # Ray is (re)starting it: its start-up is not the call's time
                        started[i] = now
                        continue
                    self.deadlines += 1
                    log.error("%s actor %d: a call ran past %s.deadline_s = %gs; killing the actor", self.role, k,
                              self.role, self.deadline_s)
                    ray.kill(self.actors[k], no_restart=False)  # Ray starts a new process (max_restarts)
                    for j in [j for j in refs if j % len(self.actors) == k]:  # every call on it died with it
                        refs.pop(j)
                        retry(j, f"killed past its deadline ({self.deadline_s:g}s)")
                continue
            i = next(k for k, r in refs.items() if r == ready[0])
            try:
                results[i] = ray.get(refs.pop(i))
            except (RayActorError, ActorUnavailableError) as exc:
                retry(i, f"failed ({exc})", exc)
        if on_pending:
            on_pending(0)
        return [results[i] for i in range(len(shards))]

    def _wait_until_back(self, k: int) -> None:
        """Block until actor ``k`` answers again (Ray restarts it); count a restart if its process changed."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                pid = ray.get(self.actors[k].ready.remote(), timeout=10)
                break
            except ActorDiedError:  # out of restarts: nothing to wait for
                raise
            except (RayActorError, ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.role} actor {k} did not come back within {self.ready_timeout_s}s")
                time.sleep(0.5)
        if pid != self.pids[k]:
            self.pids[k] = pid
            self._pid_restarts += 1

    def _alive(self, k: int) -> bool:
        """Whether actor ``k`` is up (not being restarted), from the cluster's actor table; True if unknown."""
        try:
            return ray_actor_entry(self.actors[k]).get("State") == "ALIVE"
        except Exception:  # noqa: BLE001 - a private API: then every late call is killed
            return True

    @property
    def restarts(self) -> int:
        """Processes Ray restarted for this group's actors, from the cluster's actor table (so a restart between
        two calls counts too); the new processes seen by calls if that table cannot be read."""
        try:
            return sum(int(ray_actor_entry(a).get("NumRestarts", 0)) for a in self.actors)
        except Exception:  # noqa: BLE001 - a private API: fall back to what the calls saw
            return self._pid_restarts

    def take_counts(self) -> tuple[int, int]:
        """(restarts, deadlines exceeded) since the last call, for counter metrics."""
        restarts, deadlines = self.restarts, self.deadlines
        new = (max(0, restarts - self._reported[0]), deadlines - self._reported[1])
        self._reported = (max(restarts, self._reported[0]), deadlines)
        return new

    def shutdown(self, timeout_s: float = 60) -> None:
        """Ask actors that can to release what they hold (``shutdown()``), then kill them and free the placement."""
        if self.actors and hasattr(self.cls, "shutdown"):
            refs = [a.shutdown.remote() for a in self.actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:  # a dead actor has nothing left to release
                    log.warning("%s: shutdown failed: %s", self.role, exc)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        remove_placement_group(self.pg)
