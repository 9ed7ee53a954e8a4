"""Checkpoints, restores, recovery from a failed learner group, and stopping on request: the part of a run that
writes and reads its state (actors/checkpoint.py holds the on-disk layout). A mixin of the driver's
:class:`actors.driver.Trainer`, whose attributes it uses: ``cfg``, ``ckpt_root``, ``learners``, ``critic``, ``supply``
(actors/supply.py), ``version``, ``metrics``, ``log``, ``sync_dir``, ``stopping``, ``grace_timer``, ``learner_failures``,
``model_path``; and its methods
``sync_weights``, ``_collect_counts``, ``_data_sizes``, ``_new_scheduler``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from actors import checkpoint as ckpt
from actors import pools
from actors.config import ConfigError, to_yaml
from actors.group import GroupFailed
from actors.records import pack_rollouts, unpack_rollouts

log = logging.getLogger("chorus")


class Recovery:
    def checkpoint(self, steps_done: int, reason: str) -> Path:
        """Write the state after ``steps_done`` steps to ``.tmp-step-N``, then rename it ``step-N`` (complete or
        absent, never half-written) and delete all but the newest ``checkpoint.keep``. In async mode the rollouts
        already generated for the next steps are saved too (waited for; when stopping, those done)."""
        name = f"step-{steps_done:08d}"
        final, tmp = self.ckpt_root / name, self.ckpt_root / f".tmp-{name}"
        if final.exists():  # a checkpoint of this step is in place (e.g. the one a failed group restarted from)
            return final
        if self.version != steps_done:  # the learners' state is of another step: never write that as step N
            raise RuntimeError(f"checkpoint of step {steps_done} asked while the learners hold policy version "
                               f"{self.version}")
        t = time.perf_counter()
        ready = self.supply.ahead(stopping=self.stopping.is_set())  # steps steps_done, steps_done + 1, ... in order
        plan_from = steps_done + len(ready)
        scheduler = self.supply.scheduler_state(plan_from)
        self._collect_counts()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            written = self._write_checkpoint(tmp, steps_done, plan_from, scheduler, ready, reason)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a checkpoint's worth of disk, never to be used
            raise
        ckpt.publish(tmp, final, self.cfg.checkpoint.keep)  # files, then the rename, on disk; then the pruning
        seconds = time.perf_counter() - t
        self.metrics.checkpoint_step.set(steps_done)
        self.metrics.checkpoint_time.set(written)
        self.metrics.checkpoint_seconds.set(seconds)
        log.info("checkpoint %s (%s, %.1fs)", final, reason, seconds)
        return final

    def _write_checkpoint(self, tmp: Path, steps_done: int, plan_from: int, scheduler: dict, ready: list,
                          reason: str) -> float:
        """The checkpoint's files into ``tmp``, trainer.json last; returns the time it records."""
        self.learners.all(lambda a: a.save_checkpoint.remote(str(tmp / "learner")))
        self.learners.all(lambda a: a.save_pretrained.remote(str(tmp / "model"), self.model_path))
        if self.critic is not None:
            self.critic.all(lambda a: a.save_checkpoint.remote(str(tmp / "critic")))
        if ready:
            (tmp / "rollouts.msgpack").write_bytes(pack_rollouts(ready))
        (tmp / "config.yaml").write_text(to_yaml(self.cfg))
        state = {"step": steps_done, "version": self.version, "plan_from": plan_from, "scheduler": scheduler,
                 "data": self._data_sizes(),
                 "counters": self.metrics.counters(), "reason": reason, "time": time.time()}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1) + "\n")
        return state["time"]

    def _restore(self, path: Path, state: dict) -> None:
        """Load checkpoint ``path`` into the (running) learner groups, scheduler and engines."""
        try:
            self.learners.all(lambda a: a.load_checkpoint.remote(str(path / "learner")))
            if self.critic is not None:
                self.critic.all(lambda a: a.load_checkpoint.remote(str(path / "critic")))
        except GroupFailed:
            raise
        except Exception as exc:  # a file cut short, a different number of ranks: say which checkpoint
            raise ConfigError(f"checkpoint {path}: cannot load the learner state: "
                              f"{str(exc).strip().splitlines()[-1]}") from None
        self.supply.scheduler.load_state(state["scheduler"])
        self.version = state["version"]
        rollouts = path / "rollouts.msgpack"
        self.supply.reset(planned=state["plan_from"],
                          ahead=unpack_rollouts(rollouts.read_bytes()) if rollouts.exists() else [])
        self._resync_engines()
        self.metrics.checkpoint_step.set(state["step"])
        self.metrics.checkpoint_time.set(state["time"])

    def _resync_engines(self) -> None:
        """Give the engines the learners' weights after the policy version went back (a restore)."""
        for f in [*self.sync_dir.glob("weights-*"), *self.sync_dir.glob("next-*")]:  # newer than the restored one
            f.unlink(missing_ok=True)
        self.sync_weights()

    def _recover(self, exc: GroupFailed) -> int:
        """A learner or critic group failed: restart both from the newest checkpoint (from step 0 without one) and
        return the step to go on from. A restart that fails too counts as another failure; past
        ``train.max_learner_failures``, or while stopping, raise instead."""
        while True:
            self.learner_failures += 1
            self.metrics.restarts.labels(exc.role).inc()
            for group in (self.learners, self.critic):
                if group is not None:
                    self.metrics.deadlines.labels(group.role).inc(group.take_counts()[1])
            found = ckpt.newest(self.ckpt_root)
            where = f"checkpoint {found[0]}" if found else "step 0 (no checkpoint yet)"
            limit = self.cfg.train.max_learner_failures
            if self.learner_failures > limit or self.stopping.is_set():
                why = (f"the {exc.role} group failed {self.learner_failures} times, more than "
                       f"train.max_learner_failures = {limit}" if not self.stopping.is_set() else
                       "the run is stopping, so the group is not restarted")
                raise RuntimeError(f"{exc}: {why}; the run stops. Its newest checkpoint is {where}: fix the cause "
                                   f"(see the actor logs under /tmp/ray/session_latest/logs), then continue with "
                                   f"--resume") from exc
            log.error("%s; restarting the learner groups from %s (failure %d of at most %d)", exc, where,
                      self.learner_failures, limit)
            try:
                return self._restart_learners(found)
            except GroupFailed as again:
                exc = again

    def _restart_learners(self, found: tuple[Path, dict] | None) -> int:
        self.supply.drain()  # async: what was made for the policy being rolled back
        for name in ("critic", "learners"):
            group = getattr(self, name)
            if group is not None:
                group.shutdown()
                setattr(self, name, None)
        self.learners, self.critic = pools.start_learners(self.cfg, self.model_path)
        if found:
            self._restore(*found)
            step = found[1]["step"]
        else:
            self.supply.reset(planned=0, scheduler=self._new_scheduler())
            self.version = 0
            self._resync_engines()
            step = 0
        moved = self.log.rollback(step)
        if moved:
            log.warning("%d records of steps after %d moved to metrics.rolled_back.jsonl; those steps run again",
                        moved, step)
        return step

    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Stop soon (a signal handler may call this): a step still making its rollouts is abandoned, one that is
        training finishes; then a checkpoint, and :meth:`run` raises :class:`Stopped`. If that takes longer than
        ``checkpoint.grace_s`` the process exits at once, leaving the newest complete checkpoint."""
        if self.stopping.is_set():
            return
        grace = self.cfg.checkpoint.grace_s
        log.warning("%s: stopping; writing a checkpoint within checkpoint.grace_s = %gs", reason, grace)
        self.stopping.set()
        self.grace_timer = threading.Timer(grace, self._grace_over)
        self.grace_timer.daemon = True
        self.grace_timer.start()

    def _grace_over(self) -> None:
        found = ckpt.complete(self.ckpt_root)
        log.error("checkpoint.grace_s = %gs passed before the stop's checkpoint was complete; exiting now. Newest "
                  "complete checkpoint: %s", self.cfg.checkpoint.grace_s, found[-1] if found else "none")
        logging.shutdown()
        if self.sync_dir is not None:  # weights in /dev/shm or on shared storage: not left behind
            shutil.rmtree(self.sync_dir, ignore_errors=True)
        os._exit(143)
