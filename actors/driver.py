"""The driver: set up the actor groups, run the CHORD loop, evaluate, write the run directory.

One step (DESIGN.md): plan -> generate (rollout actors) -> reward (reward actors) -> advantages (GRPO, or GAE on
the critic's values) -> reference log-probabilities (with a KL penalty) -> train (learner actors, CHORD loss; the
critic alongside) for ``epochs`` x ``mini_batches`` optimiser steps -> weight sync (learner rank 0 -> every
engine) -> metrics.

Async mode (``train.max_staleness`` = S > 0): one worker thread owns the engines. It generates and scores the rollouts
of steps k+1..k+S while the learners train step k, and loads each new policy version between two of them, so a
rollout trained on at step j was sampled from policy version j - S or newer. The PPO ratio divides by the behaviour
log-probabilities the engine returned, so the off-policy gap is corrected.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
import torch

from actors import checkpoint as ckpt
from actors import datasets, pools
from actors.config import ChorusConfig, ConfigError, advantage_spec, to_yaml
from actors.evaluation import Evaluator, EvalSet, flatten, nest
from actors.group import GroupFailed, Interrupted
from actors.metrics import STEP_PHASES, JsonlLog, Metrics
from actors.records import Rollouts, StepPlan, pack_rollouts, unpack_rollouts
from actors.scheduler import Scheduler, drop_failed_groups, uniform_groups
from learners.advantages import ADVANTAGES, needs_critic, overlong_penalty
from learners.batch import OPTIONAL, TrainBatch, even_split, split_for_ranks
from learners.losses import KL_ESTIMATORS, ref_log_ratio
from rewards.registry import check_args, isolation
from rollout.engine import weights_file
from rollout.tiny import ensure_model
from rollout.types import Completion, SamplingSpec, Scored

log = logging.getLogger("chorus")


def _chunks(items: list, k: int) -> list[list]:
    """At most ``k`` contiguous, near-equal, non-empty chunks (one per actor that has work)."""
    return even_split(items, max(1, min(k, len(items))))


def _mean(results: list[dict]) -> dict:
    """Mean of each metric over the optimiser steps of one training step."""
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def generate(rollouts, prompts: list[list[int]], spec: SamplingSpec, on_pending=None) -> list[Completion]:
    """``spec.n`` completions of each prompt from the rollout group, the prompts dealt in contiguous shards; a
    completion's ``prompt_index`` indexes ``prompts``."""
    shards = _chunks(list(range(len(prompts))), len(rollouts))

    def call(actor, shard: list[int]):  # a seeded request's prompt i samples from seed + i * n, wherever it runs
        seeded = spec if spec.seed is None else replace(spec, seed=spec.seed + shard[0] * spec.n)
        return actor.generate.remote([prompts[i] for i in shard], seeded)

    results = rollouts.map(call, shards, on_pending=on_pending)
    completions = []
    for shard, (out, _) in zip(shards, results):
        for c in out:
            c.prompt_index = shard[c.prompt_index]  # shard-local -> request-global
            completions.append(c)
    return completions


# What a step's record takes from the learners' metrics (None where a step has none of them: no on-policy rows, no
# reference, no critic, no recomputed log-probabilities).
STEP_METRICS = ("loss", "rl_loss", "sft_loss", "kl", "entropy", "clip_frac", "dual_clip_frac", "grad_norm", "lr",
                "ref_kl", "value_loss", "value_zero_loss", "value_clip_frac", "mismatch_kl", "is_ratio", "is_weight",
                "is_ratio_outside", "is_seq_outside")


class Stopped(Exception):
    """The run stopped on request (SIGTERM) after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class Trainer:
    """One run. ``resume``: continue from the newest complete checkpoint of the run (a run dir with no logged step
    and no checkpoint starts from step 0), else the run dir must not hold a run yet (:func:`ckpt.start_from`)."""

    def __init__(self, cfg: ChorusConfig, run_dir: str | Path, *, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        found = ckpt.start_from(cfg, self.run_dir, self.ckpt_root, resume=resume)
        self.start_step = found[1]["step"] if found else 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        for i, f in enumerate(cfg.reward.functions):  # fail before anything starts
            try:
                check_args(f.name, dict(f.args))
            except KeyError as exc:
                raise ConfigError(f"config key 'reward.functions[{i}].name': {exc.args[0]}") from None
            except TypeError as exc:  # RewardArgError names the arg at fault
                key = f"reward.functions[{i}].args" + (f".{exc.arg}" if getattr(exc, "arg", None) else "")
                raise ConfigError(f"config key '{key}': {exc}") from None
            try:
                isolation(f.name, f.isolation)
            except ValueError as exc:
                raise ConfigError(f"config key 'reward.functions[{i}].isolation': {exc}") from None
        try:
            self.model_path = ensure_model(cfg.model.path, cfg.model.build)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        self._load_data()
        if found:
            sizes = self._data_sizes()
            if sizes != found[1]["data"]:
                raise ConfigError(f"data: the data sets now have {sizes} rows, {found[1]['data']} when checkpoint "
                                  f"{found[0]} was written; its cursors index those rows: resume with the same files")
        self.scheduler = Scheduler(cfg.algo, cfg.rollout.n, len(self.prompts), len(self.expert), cfg.train.seed)
        self.advantage_spec = advantage_spec(cfg)
        self.stopping = threading.Event()  # set by request_stop (SIGTERM): finish or abandon the step, checkpoint
        self.grace_timer: threading.Timer | None = None
        self.learner_failures = 0
        self.pending: deque[tuple[int, Future]] = deque()  # async: (step, its rollouts), generating ahead
        self.plan_states: dict[int, dict] = {}  # step -> scheduler state before it was planned
        self.planned = 0  # the next step to plan
        # Everything below holds a resource (a port, a file, shared memory, processes): close() releases what
        # was started, whatever failed.
        self.metrics = self.log = self.sync_dir = self.worker = None
        self.learners = self.rollouts = self.rewards = self.critic = self.references = None
        self.own_ray = False
        self.version = 0  # training steps whose weights the learners hold (the policy version)
        self.engine_version = 0  # ... and the engines
        try:
            self.metrics = Metrics(cfg.metrics.host, cfg.metrics.port)
            for f in cfg.reward.functions:  # export zeros from the start, not only after a first failure
                self.metrics.reward_failures.labels(f.name)
                self.metrics.reward.labels(f.name)
            for kind in dict.fromkeys(("prompts", "expert", "eval", *self.skipped_rows)):  # each set once (a
                self.metrics.skipped_rows.labels(kind).inc(  # resumed run has them in the checkpoint's counters)
                    0 if found else len(self.skipped_rows.get(kind, ())))
            (self.run_dir / "metrics_url").write_text(self.metrics.url + "\n")
            self.log = JsonlLog(self.run_dir / "metrics.jsonl", self.start_step if resume else None)
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # weight hand-off in memory, not on disk
            if cfg.rollout.sync_dir:  # shared storage: engines on other nodes than learner rank 0 read it too
                Path(cfg.rollout.sync_dir).mkdir(parents=True, exist_ok=True)
            self.sync_dir = Path(tempfile.mkdtemp(prefix="chorus-sync-", dir=cfg.rollout.sync_dir or shm))
            self._start_ray()
            self._start_actors()
            self.loads: deque[Future] = deque()  # async: weight loads queued on the worker (checked: none is lost)
            if cfg.train.max_staleness:  # FIFO: the engines' order
                self.worker = ThreadPoolExecutor(1, thread_name_prefix="chorus-engines")
            if found:
                self.metrics.restore_counters(found[1]["counters"])
                self._restore(*found)
                log.info("resumed from %s (step %d)", found[0], self.start_step)
        except BaseException:
            self.close()
            raise

    # --- setup ------------------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        data = datasets.load(self.cfg.data, self.run_dir / "data", eval_max_rows=self.cfg.train.eval_max_rows)
        self.prompts, self.expert, self.skipped_rows = data.prompts, data.expert, data.skipped
        self.tokenizer = tok = AutoTokenizer.from_pretrained(self.model_path)
        self.prompt_ids = [tok(r["prompt"]).input_ids for r in self.prompts]
        self.expert_rows = [
            (tok(r["prompt"]).input_ids, tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id])
            for r in self.expert
        ]
        self.evaluator = Evaluator([EvalSet(name, rows, [tok(r["prompt"]).input_ids for r in rows])
                                    for name, rows in data.eval_sets.items()],
                                   max_new_tokens=self.cfg.rollout.max_new_tokens,
                                   samples=self.cfg.train.eval_samples, seed=self.cfg.train.seed)

    def _data_sizes(self) -> dict[str, int]:
        """Rows of the sets the scheduler's cursors index (a resume must find the same)."""
        return {"prompts": len(self.prompts), "expert": len(self.expert)}

    def _start_ray(self) -> None:
        address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
        self.own_ray = not ray.is_initialized() and not address
        if not ray.is_initialized():
            if address:
                ray.init(address=address)
            else:
                ray.init(num_cpus=self.cfg.ray.num_cpus, include_dashboard=self.cfg.ray.dashboard,
                         log_to_driver=True)

    def _start_actors(self) -> None:
        self.learners, self.critic = pools.start_learners(self.cfg, self.model_path)
        self.references, self.rollouts, self.rewards = pools.start_pools(self.cfg, self.model_path, self.sync_dir)
        for group in (self.rollouts, self.rewards):  # their waits end when the run is asked to stop
            group.interrupt = self.stopping

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train from ``start_step`` to ``train.steps``, evaluate, save the final model and checkpoint. A learner or
        critic group that fails is restarted from the newest checkpoint (``train.max_learner_failures``). After
        :meth:`request_stop` the run writes a checkpoint and raises :class:`Stopped`."""
        from tqdm import tqdm

        cfg = self.cfg.train
        start = time.perf_counter()
        accuracy = None
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None)  # off without a tty
        step = self.start_step
        initial = None
        if cfg.eval_at_start and step == 0:  # the starting model's accuracy, for the run's own comparison
            try:
                initial = self._on_engines(self.evaluate)
                self.log.write({"step": 0, "initial": True, **initial})
                bar.write("before training: " + self._eval_line(initial))
            except Interrupted:
                pass
        while step < cfg.steps and not self.stopping.is_set():
            try:
                record = self._next_step(step)
            except Interrupted:  # asked to stop while the step's rollouts were made: the step is abandoned
                break
            except GroupFailed as exc:
                step = self._recover(exc)
                continue
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                try:
                    record.update(self._on_engines(self.evaluate))
                    accuracy = record["eval_accuracy"]
                except Interrupted:  # stopping: the step is done, its evaluation is not needed
                    pass
            self.log.write(record)
            bar.update(1)
            bar.write(self._console_line(record))
            step += 1
            every = self.cfg.checkpoint.every
            if every and step % every == 0 and step < cfg.steps and not self.stopping.is_set():
                try:
                    self.checkpoint(step, "periodic")
                except GroupFailed as exc:
                    step = self._recover(exc)
        bar.close()
        if self.stopping.is_set():
            raise Stopped(step, self.checkpoint(step, "sigterm"))
        try:
            final = self._on_engines(self.evaluate)
        except Interrupted:  # stopped during the final evaluation: every step is trained
            raise Stopped(step, self.checkpoint(step, "sigterm")) from None
        for load in self.loads:  # async: every queued load ran before the final evaluation; none may have failed
            load.result()
        self.log.write({"step": cfg.steps, **final, "final": True})
        print("after training: " + self._eval_line(final), flush=True)
        self.learners.all(lambda a: a.save_pretrained.remote(str(self.run_dir / "final"), self.model_path))
        last = self.checkpoint(cfg.steps, "final")
        summary = {"steps": cfg.steps, "final_eval_accuracy": final["eval_accuracy"],
                   "final_eval": nest(final),
                   "last_periodic_eval_accuracy": accuracy,
                   "initial_eval_accuracy": initial["eval_accuracy"] if initial else None,
                   "wall_seconds": time.perf_counter() - start, "metrics_url": self.metrics.url,
                   "model": str(self.run_dir / "final"), "checkpoint": str(last),
                   "learner_failures": self.learner_failures}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _plan(self, step: int) -> StepPlan:
        self.plan_states[step] = self.scheduler.state()  # a checkpoint taken before `step` trains needs it
        self.planned = step + 1
        return self.scheduler.plan(step)

    def _next_step(self, step: int) -> dict:
        """Step ``step``: synchronous, or in async mode keep S steps of rollouts generating ahead and train on the
        oldest."""
        for old in [k for k in self.plan_states if k < step]:
            del self.plan_states[old]
        staleness = self.cfg.train.max_staleness
        if not staleness:
            return self.step(self._plan(step))
        while self.planned <= min(step + staleness, self.cfg.train.steps - 1):
            self.pending.append((self.planned, self.worker.submit(self._rollouts, self._plan(self.planned))))
        t = time.perf_counter()
        planned, future = self.pending[0]
        assert planned == step, (planned, step)
        rollouts = future.result()  # raises Interrupted when stopping, before the step trains
        self.pending.popleft()
        while self.loads and self.loads[0].done():
            self.loads.popleft().result()  # raises what the load raised
        return self._learn(rollouts, rollout_wait=time.perf_counter() - t)

    # --- checkpoints, recovery, stopping ----------------------------------------------------------------------

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
        ready = []
        for _, future in self.pending:  # steps steps_done, steps_done + 1, ... in order
            try:
                ready.append(future.result())
            except Exception:
                if not self.stopping.is_set():
                    raise
                break  # stopping: keep the rollouts made before it
        plan_from = steps_done + len(ready)
        scheduler = self.plan_states[plan_from] if plan_from < self.planned else self.scheduler.state()
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
        self.scheduler.load_state(state["scheduler"])
        self.version, self.planned, self.plan_states = state["version"], state["plan_from"], {}
        rollouts = path / "rollouts.msgpack"
        self.pending = deque()
        for r in unpack_rollouts(rollouts.read_bytes()) if rollouts.exists() else []:
            future: Future = Future()
            future.set_result(r)
            self.pending.append((r.plan.step, future))
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
        self._drain_worker()
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
            self.scheduler = Scheduler(self.cfg.algo, self.cfg.rollout.n, len(self.prompts), len(self.expert),
                                       self.cfg.train.seed)
            self.version, self.planned, self.plan_states, self.pending = 0, 0, {}, deque()
            self._resync_engines()
            step = 0
        moved = self.log.rollback(step)
        if moved:
            log.warning("%d records of steps after %d moved to metrics.rolled_back.jsonl; those steps run again",
                        moved, step)
        return step

    def _drain_worker(self) -> None:
        """Async mode: cancel the queued rollouts and weight loads and wait for the running ones (their results are
        of a policy that is being rolled back)."""
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

    def _on_engines(self, fn, *args):
        """Run ``fn`` where engine work runs: inline, or in async mode queued behind the worker's rollouts and weight
        loads (so it sees the newest policy the learners had when it was queued)."""
        return self.worker.submit(fn, *args).result() if self.worker else fn(*args)

    def step(self, plan: StepPlan) -> dict:
        """One synchronous step (generate, score, train, sync); returns its metrics.jsonl record."""
        return self._learn(self._rollouts(plan))

    def _learn(self, rollouts: Rollouts, rollout_wait: float | None = None) -> dict:
        """Train on one step's rollouts and hand the new weights to the engines (inline in synchronous mode, queued
        on the engine worker in async mode); returns the step's record (also exported to Prometheus)."""
        plan = rollouts.plan
        phase = dict.fromkeys(STEP_PHASES, 0.0)
        phase.update(rollouts.phase)
        t_step = time.perf_counter()
        t = time.perf_counter()
        batch = self._batch(plan, rollouts)
        train = self._train(batch, plan)
        phase["train"] = time.perf_counter() - t
        t = time.perf_counter()
        self.version += 1
        path, nbytes = self._save_weights()
        if self.worker is None:
            self._load_weights(path)
        else:
            self.loads.append(self.worker.submit(self._load_weights, path))
        phase["sync"] = time.perf_counter() - t
        total = time.perf_counter() - t_step
        if rollout_wait is None:  # synchronous: the rollout phases are part of the step
            total += rollouts.phase.get("generate", 0.0) + rollouts.phase.get("reward", 0.0)
            phase["other"] = max(0.0, total - sum(phase.values()))
        else:  # async: they overlapped the previous step's training; the step waited only `rollout_wait`
            total += rollout_wait
            phase["other"] = max(0.0, total - rollout_wait - phase["train"] - phase["sync"])

        rl_rows, scored = rollouts.rows, rollouts.scored
        record = {"step": plan.step, "mu": plan.mu, "reward_mean": rollouts.reward_mean,
                  **{k: train.get(k) for k in STEP_METRICS},
                  "optimizer_steps": train["optimizer_steps"], "policy_lag": plan.step - rollouts.version,
                  "samples": len(rl_rows), "tokens": sum(len(c.token_ids) for _, c in rl_rows),
                  "dropped_groups": len(rollouts.dropped), "filtered_groups": rollouts.filtered,
                  "sample_rounds": rollouts.rounds,
                  "truncated_rows": sum(c.finish_reason == "length" for _, c in rl_rows),
                  "expert_rows": len(plan.expert_ids), "weight_sync_bytes": nbytes * len(self.rollouts),
                  "step_seconds": total, **{f"{k}_seconds": v for k, v in phase.items()}}
        if rollout_wait is not None:
            record["rollout_wait_seconds"] = rollout_wait
        if scored:
            for name in dict.fromkeys(k for s in scored for k in s.components):  # a failed row lacks sub-components
                values = [s.components[name] for s in scored if name in s.components]
                record[f"reward/{name}"] = sum(values) / len(values)
            record["response_tokens_mean"] = record["tokens"] / len(rl_rows)
        self.metrics.observe_step(record)
        self._collect_counts()
        return record

    def _collect_counts(self) -> None:
        """Restarts and deadline kills of the pools Ray restarts, into their counters (after each step, before each
        checkpoint)."""
        for group in (self.rollouts, self.rewards, self.references):
            if group is not None:
                restarts, deadlines = group.take_counts()
                self.metrics.restarts.labels(group.role).inc(restarts)
                self.metrics.deadlines.labels(group.role).inc(deadlines)

    def _rollouts(self, plan: StepPlan) -> Rollouts:
        """Generate and score the step's on-policy rows (none when mu = 1), prompt-major in groups of rollout.n.

        Groups leave the step before advantages: with ``reward.on_failure = drop_group`` those whose reward failed on
        any sample; with ``algo.dynamic_sampling`` (DAPO) those whose rewards are all equal, which carry no GRPO signal,
        and more prompts are sampled in further rounds (up to ``algo.max_sample_rounds``) until the step has
        ``prompts_per_step`` groups. The extra prompts of round r are drawn by (seed, step, r), not from the data
        cursor, so a resumed run draws the same ones and async mode's planning ahead cannot change them."""
        if self.stopping.is_set():
            raise Interrupted("rollouts")
        version, phase = self.engine_version, {}
        if not plan.prompt_ids:
            return Rollouts(plan, [], torch.zeros(0), [], version, phase)
        a, n, want = self.cfg.algo, self.cfg.rollout.n, len(plan.prompt_ids)
        rows: list[tuple[list[int], Completion]] = []
        scored: list[Scored] = []
        dropped, filtered, sampled, rounds, prompt_ids = [], 0, [], 0, plan.prompt_ids
        while True:
            got_rows, got_scored, got_dropped = self._sample_groups(plan.step, rounds, prompt_ids, phase)
            rounds += 1
            dropped += got_dropped
            sampled += [s.total for s in got_scored]
            if a.dynamic_sampling:
                uniform = set(uniform_groups(got_scored, n))
                filtered += len(uniform)
                keep = [i for i in range(len(got_rows)) if i // n not in uniform][: (want - len(rows) // n) * n]
                got_rows, got_scored = [got_rows[i] for i in keep], [got_scored[i] for i in keep]
            rows += got_rows
            scored += got_scored
            if not a.dynamic_sampling or len(rows) >= want * n or rounds >= a.max_sample_rounds:
                break
            extra = random.Random(f"chorus-refill-{self.cfg.train.seed}-{plan.step}-{rounds}")
            prompt_ids = extra.sample(range(len(self.prompts)), min(want, len(self.prompts)))
        if a.dynamic_sampling and len(rows) < want * n:
            log.warning("step %d: %d of %d prompt groups with a reward spread after %d sampling rounds "
                        "(algo.max_sample_rounds); training on those", plan.step, len(rows) // n, want, rounds)
        rewards = torch.tensor([s.total for s in scored])
        return Rollouts(plan, rows, rewards, scored, version, phase, dropped, filtered=filtered, rounds=rounds,
                        reward_mean=sum(sampled) / len(sampled) if sampled else None)

    def _sample_groups(self, step: int, round_: int, prompt_ids: list[int], phase: dict
                       ) -> tuple[list[tuple[list[int], Completion]], list[Scored], list[int]]:
        """rollout.n completions of each prompt-set row of ``prompt_ids``, scored (with the overlong penalty, when
        set) and without the groups a failed reward drops: (rows, scores, dropped prompt-set rows). Adds the
        generate and reward seconds to ``phase``."""
        rc, a = self.cfg.rollout, self.cfg.algo
        # each round's own seed: a retried, resumed or restarted engine samples exactly what the first would have
        key = f"chorus-sample-{self.cfg.train.seed}-{step}" + (f"-{round_}" if round_ else "")
        spec = SamplingSpec(n=rc.n, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                            seed=random.Random(key).getrandbits(48))
        t = time.perf_counter()
        completions = self._generate([self.prompt_ids[i] for i in prompt_ids], spec)
        phase["generate"] = phase.get("generate", 0.0) + time.perf_counter() - t
        rows = [self.prompts[prompt_ids[c.prompt_index]] for c in completions]
        t = time.perf_counter()
        scored = self._score(rows, [c.text for c in completions])
        phase["reward"] = phase.get("reward", 0.0) + time.perf_counter() - t
        if a.overlong_buffer:  # DAPO's soft overlong punishment, a component of the reward like any other
            penalty = overlong_penalty(torch.tensor([len(c.token_ids) for c in completions]),
                                       max_len=rc.max_new_tokens, buffer=a.overlong_buffer, factor=a.overlong_penalty)
            for s, p in zip(scored, penalty.tolist()):
                s.components["overlong"] = p
                s.total += p
        dropped = []
        if self.cfg.reward.on_failure == "drop_group":
            keep, groups = drop_failed_groups(scored, rc.n)
            dropped = [prompt_ids[completions[g * rc.n].prompt_index] for g in groups]
            if dropped:
                log.warning("step %d: dropped %d of %d prompt groups whose reward failed: %s", step,
                            len(dropped), len(prompt_ids), [self.prompts[i]["prompt"][:80] for i in dropped])
            completions, scored = [completions[i] for i in keep], [scored[i] for i in keep]
        return [(self.prompt_ids[prompt_ids[c.prompt_index]], c) for c in completions], scored, dropped

    def _generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        return generate(self.rollouts, prompts, spec, on_pending=self.metrics.queue.labels("rollout").set)

    def _score(self, rows: list[dict], responses: list[str]):
        idx = _chunks(list(range(len(rows))), len(self.rewards))
        results = self.rewards.map(
            lambda a, s: a.score.remote([rows[i]["prompt"] for i in s], [responses[i] for i in s], [rows[i] for i in s]),
            idx, on_pending=self.metrics.queue.labels("reward").set)
        scored = [s for out, _ in results for s in out]
        failed: dict[str, Counter] = {}  # reward -> prompt -> failed samples: one log line per reward, not per sample
        for row, s in zip(rows, scored):
            for name in s.failed:
                self.metrics.reward_failures.labels(name).inc()
                failed.setdefault(name, Counter())[row["prompt"]] += 1
        outcome = "their groups are dropped" if self.cfg.reward.on_failure == "drop_group" else "fallback score used"
        for name, prompts in failed.items():
            log.warning("reward '%s' failed on %d samples (%s), of the prompts: %s", name, sum(prompts.values()),
                        outcome, ", ".join(f"{p[:80]!r} x{k}" for p, k in prompts.items()))
        return scored

    def _batch(self, plan: StepPlan, rollouts: Rollouts) -> TrainBatch:
        """The step's rows: on-policy rows with per-token advantages (and reference log-probabilities, the learner's
        recomputed log-probabilities, critic values and returns where the algorithm uses them), then the expert
        rows."""
        a = self.cfg.algo
        rows = rollouts.rows
        lengths = [len(c.token_ids) for _, c in rows]
        rl = TrainBatch(input_ids=[p + c.token_ids for p, c in rows], prompt_lens=[len(p) for p, _ in rows],
                        old_logprobs=[c.logprobs for _, c in rows], advantages=[[0.0] * n for n in lengths],
                        is_expert=[False] * len(rows))
        if rl:
            if a.recompute_logprobs:  # the proximal policy is the learner's; the engine's is the behaviour policy
                rl.behaviour_logprobs = rl.old_logprobs
                rl.old_logprobs = self._per_rank(self.learners, rl, lambda actor, b: actor.logprobs.remote(b))
            if a.kl_coef > 0:
                group = self.learners if self.references is None else self.references  # colocated or not
                rl.ref_logprobs = self._per_rank(group, rl,
                                                 lambda actor, b: actor.reference_logprobs.remote(b))
            self._advantages(rl, rollouts.rewards, lengths)
            if a.overlong_filter:  # DAPO: a response cut off at the budget leaves the loss (it counted in its group)
                rl = rl.select([i for i, (_, c) in enumerate(rows) if c.finish_reason != "length"])
        expert = [self.expert_rows[i] for i in plan.expert_ids]
        zeros = [[0.0] * len(r) for _, r in expert]
        rl.input_ids += [p + r for p, r in expert]
        rl.prompt_lens += [len(p) for p, _ in expert]
        rl.old_logprobs += zeros
        rl.advantages += zeros
        rl.is_expert += [True] * len(expert)
        for k in OPTIONAL:
            if getattr(rl, k) is not None:
                setattr(rl, k, getattr(rl, k) + zeros)
        return rl

    def _advantages(self, rl: TrainBatch, rewards: torch.Tensor, lengths: list[int]) -> None:
        """Per-token advantages of the on-policy rows by ``algo.advantage`` (with the critic's values and GAE returns
        for an estimator that uses a critic; with ``kl_penalty: reward`` the KL penalty on each token's reward)."""
        a = self.cfg.algo
        width = max(max(lengths), 1)

        def padded(rows: list[list[float]]) -> torch.Tensor:  # [B][T_b] -> [B, width], 0 after each row
            out = torch.zeros(len(rows), width)
            for b, row in enumerate(rows):
                out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
            return out

        mask = padded([[1.0] * n for n in lengths])
        values = None
        if needs_critic(a.advantage):
            rl.old_values = self._per_rank(self.critic, rl, lambda actor, b: actor.values.remote(b))
            values = padded(rl.old_values)
        token_rewards = None
        if a.kl_penalty == "reward" and rl.ref_logprobs is not None:
            # -kl_coef * KL estimate of each token the policy sampled, on the sampling policy's log-probabilities
            log_r = ref_log_ratio(padded(rl.old_logprobs), padded(rl.ref_logprobs), mask)
            token_rewards = -a.kl_coef * KL_ESTIMATORS[a.kl_estimator](log_r)
        adv, returns = ADVANTAGES[a.advantage](rewards, mask, self.advantage_spec, values=values,
                                               token_rewards=token_rewards)
        rl.advantages = [adv[b, :n].tolist() for b, n in enumerate(lengths)]
        if returns is not None:
            rl.returns = [returns[b, :n].tolist() for b, n in enumerate(lengths)]

    @staticmethod
    def _per_rank(group, batch: TrainBatch, call) -> list[list[float]]:
        """``call(actor, rows)`` with the rows dealt to every actor of ``group`` (each gets a call, if only a filler
        row: ZeRO-3 forward passes are collective); per-row results in the batch's order."""
        shards = split_for_ranks(batch, len(group), len(batch))  # [rank][one micro-batch]
        if group.role in ("learner", "critic"):  # DeepSpeed ranks: collective, no retry
            results = group.get(group.submit(lambda actor, micros: call(actor, micros[0]), shards))
        else:
            results = group.map(lambda actor, micros: call(actor, micros[0]), shards)
        out: list = [None] * len(batch)
        for rank, rows in enumerate(results):
            for j, value in enumerate(rows[: len(range(rank, len(batch), len(group)))]):
                out[rank + j * len(group)] = value
        return out

    def _train(self, batch: TrainBatch, plan: StepPlan) -> dict:
        """``epochs`` passes over the step's rows, each in ``mini_batches`` optimiser steps (rows shuffled per pass);
        the critic takes the same mini-batches' on-policy rows alongside. Returns metrics averaged over the steps.

        A step with no rows (a failed reward dropped every group and there are no expert rows) takes no optimiser
        step, since AdamW would still move the weights on a zero gradient: ``optimizer_steps`` 0, no loss."""
        a, lc = self.cfg.algo, self.cfg.learner
        rng = random.Random(self.cfg.train.seed * 1_000_003 + plan.step)
        order = list(range(len(batch)))
        policy, critic = [], []
        for _ in range(a.epochs):
            if a.epochs > 1 or a.mini_batches > 1:
                rng.shuffle(order)
            for rows in even_split(order, a.mini_batches):
                if not rows:
                    continue
                mini = batch.select(rows)
                counts = mini.counts()
                self.metrics.queue.labels("learner").set(len(self.learners))
                refs = self.learners.submit(
                    lambda actor, micros: actor.train_step.remote(micros, mu=plan.mu, **counts),
                    split_for_ranks(mini, len(self.learners), lc.micro_batch_size))
                critic_refs = []
                if self.critic is not None and counts["n_rl_tokens"]:
                    on_policy = mini.select([i for i, e in enumerate(mini.is_expert) if not e])
                    critic_refs = self.critic.submit(
                        lambda actor, micros: actor.train_step.remote(micros, n_tokens=counts["n_rl_tokens"]),
                        split_for_ranks(on_policy, len(self.critic), self.cfg.critic.micro_batch_size))
                policy.append(self._reduce(self.learners.get(refs)))
                if critic_refs:
                    critic.append(self._reduce(self.critic.get(critic_refs)))
        self.metrics.queue.labels("learner").set(0)
        if not policy:
            return {"optimizer_steps": 0}
        out = _mean(policy)
        out["optimizer_steps"] = len(policy)
        if critic:
            c = _mean(critic)
            out.update(value_loss=c["value_loss"], value_zero_loss=c["value_zero_loss"],
                       value_clip_frac=c["value_clip_frac"])
        return out

    @staticmethod
    def _reduce(results: list[dict]) -> dict:
        """One optimiser step's metrics from every rank's partial sums of global means."""
        out = {k: sum(r[k] for r in results) for k in results[0]}
        for k in ("grad_norm", "lr"):
            out[k] = results[0][k]
        return out

    def sync_weights(self) -> int:
        """Hand the learners' current weights to every engine, now; returns the bytes pushed."""
        path, nbytes = self._save_weights()
        self._load_weights(path)
        return nbytes * len(self.rollouts)

    def _save_weights(self) -> tuple[str, int]:
        """Learner rank 0 writes this policy version to ``sync_dir`` (one file per version: in async mode the
        engines may still be loading the previous one). Returns the path and its size.

        By default that is node-local shared memory, which engines on other nodes than learner rank 0 cannot read;
        ``rollout.sync_dir`` on shared storage makes it multi-node (through the file system, not NCCL). The file is
        named ``next-*`` until the engines load it: an engine restarted meanwhile takes the version its peers hold."""
        path = os.path.join(self.sync_dir, "next-" + os.path.basename(weights_file(self.sync_dir, self.version)))
        nbytes = self.learners.all(lambda a: a.save_weights.remote(path))[0]
        self.metrics.sync_bytes.inc(nbytes * len(self.rollouts))
        return path, nbytes

    def _load_weights(self, staged: str) -> None:
        """Every engine loads the ``next-*`` file ``staged``, renamed ``weights-*`` first; older versions are then
        deleted. An engine that Ray restarts loads the newest ``weights-*`` file when it starts
        (``RolloutActor(weights_dir=...)``): the version its peers hold or are loading, never an older one and, in
        async mode, never one the learners wrote ahead of the engines."""
        t = time.perf_counter()
        path = os.path.join(os.path.dirname(staged), os.path.basename(staged).removeprefix("next-"))
        os.replace(staged, path)
        # not interruptible: it follows a step that trained, which must finish (and be logged) when stopping
        self.rollouts.map(lambda a, p: a.load_weights.remote(p), [path] * len(self.rollouts), interruptible=False)
        self.engine_version = int(Path(path).stem.rsplit("-", 1)[1])
        for old in self.sync_dir.glob("weights-*.safetensors"):
            if old.name < Path(path).name:
                old.unlink(missing_ok=True)
        self.metrics.sync_seconds.set(time.perf_counter() - t)

    def evaluate(self) -> dict[str, float]:
        """Every held-out set through the rollout engines (actors/evaluation.py); returns the metrics.jsonl keys:
        ``eval_accuracy`` (the target's greedy accuracy), ``eval/<set>/<metric>`` and ``eval_seconds``."""
        results = flatten(self.evaluator.run(self._generate))
        self.metrics.observe_eval(results)
        return results

    def _console_line(self, r: dict) -> str:
        def fmt(key: str, spec: str) -> str:  # None: no on-policy rows, or no rows at all this step
            return "-" if r[key] is None else format(r[key], spec)

        line = (f"step {r['step']:>4}  reward {fmt('reward_mean', '.3f')}  loss {fmt('loss', '.4f')} "
                f"(rl {fmt('rl_loss', '.4f')} sft {fmt('sft_loss', '.4f')})  mu {r['mu']:.3f}  "
                f"{r['step_seconds']:.2f}s")
        if r["dropped_groups"]:
            line += f"  dropped {r['dropped_groups']} groups"
        if "eval_accuracy" in r:
            line += "  " + self._eval_line(r)
        return line

    @staticmethod
    def _eval_line(r: dict) -> str:
        line = f"eval_acc {r['eval_accuracy']:.3f}"
        if (k := next((k for k in r if k.startswith("eval/target/pass@") and k != "eval/target/pass@1"), None)):
            line += f" ({k.split('/')[2]} {r[k]:.3f})"
        kept = [(k.split("/")[1], v) for k, v in r.items()
                if k.startswith("eval/") and k.endswith("/accuracy") and k != "eval/target/accuracy"]
        if kept:
            line += "  retention " + " ".join(f"{name} {v:.2f}" for name, v in kept)
        return line

    def close(self) -> None:
        """Stop everything this trainer started; safe to call twice."""
        if self.grace_timer is not None:
            self.grace_timer.cancel()
        if self.worker is not None:  # its calls on actors fail once the actors are gone, and it ends
            self.worker.shutdown(wait=False, cancel_futures=True)
            self.worker = None
        for name in ("rollouts", "rewards", "references", "critic", "learners"):
            group = getattr(self, name)
            if group is not None:
                group.shutdown()
                setattr(self, name, None)
        if self.metrics is not None:
            self.metrics.close()
        if self.log is not None:
            self.log.close()
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
        if self.own_ray and ray.is_initialized():
            ray.shutdown()
