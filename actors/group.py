"""ActorGroup: N Ray actors of one role, their placement group, their env, and calls that survive a restart."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("chorus")


class ActorGroup:
    """``size`` actors of ``cls``, one placement-group bundle each (``bundle``: e.g. {"CPU": 1, "GPU": 1}).

    ``make_kwargs(rank)`` gives each actor's constructor arguments. Actors that may be restarted by Ray
    (``max_restarts`` > 0) have calls that died with them retried by :meth:`map` up to ``retries`` times.
    """

    def __init__(self, role: str, cls: type, size: int, bundle: dict[str, float],
                 make_kwargs: Callable[[int], dict], *, env: dict[str, str] | None = None,
                 strategy: str = "PACK", max_restarts: int = 0, retries: int = 0, ready_timeout_s: float = 600):
        self.role, self.cls, self.retries, self.restarts, self._reported = role, cls, retries, 0, 0
        self.ready_timeout_s = ready_timeout_s
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
        actor order. For collective work (learner ranks): no retry."""
        return ray.get([call(a) for a in self.actors])

    def submit(self, call: Callable[[ActorHandle, Any], ObjectRef], shards: list) -> list[ObjectRef]:
        """``call(actor i, shards[i])`` on every actor, without waiting: collective work (one shard per rank, no
        retry) that the caller overlaps with another group's before ``ray.get``."""
        if len(shards) != len(self.actors):
            raise ValueError(f"{self.role}: {len(shards)} shards for {len(self.actors)} ranks")
        return [call(a, shard) for a, shard in zip(self.actors, shards)]

    def map(self, call: Callable[[ActorHandle, Any], ObjectRef], shards: list,
            on_pending: Callable[[int], None] | None = None) -> list[Any]:
        """``call(actor, shards[i])`` on actor ``i % size``; results in shard order. A shard whose actor died is
        resubmitted once Ray has restarted the actor, up to ``retries`` times; ``restarts`` counts the new
        processes seen."""
        def submit(i: int) -> ObjectRef:
            return call(self.actors[i % len(self.actors)], shards[i])

        refs = {i: submit(i) for i in range(len(shards))}
        results: dict[int, Any] = {}
        attempts = dict.fromkeys(refs, 0)
        while refs:
            if on_pending:
                on_pending(len(refs))
            ready, _ = ray.wait(list(refs.values()), num_returns=1)
            i = next(k for k, r in refs.items() if r == ready[0])
            try:
                results[i] = ray.get(refs.pop(i))
            except (RayActorError, ActorUnavailableError) as exc:
                attempts[i] += 1
                if attempts[i] > self.retries:
                    raise RuntimeError(f"{self.role} actor {i % len(self.actors)} failed {attempts[i]} times "
                                       f"on the same work: {exc}") from exc
                log.warning("%s actor %d failed (%s); retrying its work once it is back", self.role,
                            i % len(self.actors), exc)
                self._wait_until_back(i % len(self.actors))
                refs[i] = submit(i)
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
            self.restarts += 1

    def take_restarts(self) -> int:
        """Restarts since the last call (for a counter metric)."""
        new, self._reported = self.restarts - self._reported, self.restarts
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
