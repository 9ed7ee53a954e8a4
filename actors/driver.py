"""The driver: set up the actor groups, run the CHORD loop, evaluate, write the run directory.

One step (DESIGN.md, :meth:`Trainer._learn`): plan -> rollouts (actors/rollouts.py: the engines generate, the reward
actors score) -> batch (advantages by ``algo.advantage``; reference and recomputed log-probabilities where used;
the expert rows) -> train (learner actors, CHORD loss, the critic alongside, ``epochs`` x ``mini_batches`` optimiser
steps) -> sync (learner rank 0 -> every engine) -> record (metrics.jsonl, Prometheus).

Where the rollouts come from is actors/supply.py: made when the step asks, or in async mode (``train.max_staleness``
= S > 0) made up to S steps ahead while the learners train. Checkpoints, restores, recovery from a failed learner
group and stopping live in actors/recovery.py.
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
from pathlib import Path

import ray
import torch

from actors import checkpoint as ckpt
from actors import datasets, pools
from actors.config import ChorusConfig, ConfigError, advantage_spec, to_yaml
from actors.episodes import episode_metrics
from actors.evaluation import Evaluator, EvalSet, flatten, nest
from actors.group import GroupFailed, Interrupted
from actors.metrics import STEP_PHASES, JsonlLog, Metrics
from actors.sinks import open_sinks
from actors.records import Rollouts, StepPlan
from actors.recovery import Recovery
from actors.rollouts import RolloutMaker
from actors.scheduler import Scheduler
from actors.supply import AsyncRolloutSupply, RolloutSupply
from learners.advantages import ADVANTAGES, needs_critic
from learners.batch import OPTIONAL, TrainBatch, even_split, split_for_ranks
from learners.losses import kl_reward
from rewards.envs import check_env_args
from rewards.registry import check_args, isolation
from rollout.engine import weights_file
from rollout.tiny import ensure_model

log = logging.getLogger("chorus")


def _mean(results: list[dict]) -> dict:
    """Mean of each metric over the optimiser steps of one training step."""
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


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


class Trainer(Recovery):
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
        if cfg.env.name:
            try:
                check_env_args(cfg.env.name, dict(cfg.env.args))
            except KeyError as exc:
                raise ConfigError(f"config key 'env.name': {exc.args[0]}") from None
            except TypeError as exc:
                key = "env.args" + (f".{exc.arg}" if getattr(exc, "arg", None) else "")
                raise ConfigError(f"config key '{key}': {exc}") from None
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
        self.advantage_spec = advantage_spec(cfg)
        self.stopping = threading.Event()  # set by request_stop (SIGTERM): finish or abandon the step, checkpoint
        self.grace_timer: threading.Timer | None = None
        self.learner_failures = 0
        # Everything below holds a resource (a port, a file, shared memory, processes): close() releases what
        # was started, whatever failed.
        self.metrics = self.log = self.sync_dir = self.supply = None
        self.learners = self.rollouts = self.rewards = self.critic = self.references = self.envs = None
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
            self.log = JsonlLog(self.run_dir / "metrics.jsonl", self.start_step if resume else None,
                                sinks=open_sinks(cfg, self.run_dir))
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # weight hand-off in memory, not on disk
            if cfg.rollout.sync_dir:  # shared storage: engines on other nodes than learner rank 0 read it too
                Path(cfg.rollout.sync_dir).mkdir(parents=True, exist_ok=True)
            self.sync_dir = Path(tempfile.mkdtemp(prefix="chorus-sync-", dir=cfg.rollout.sync_dir or shm))
            self._start_ray()
            self._start_actors()
            self.maker = RolloutMaker(cfg, self.prompts, self.prompt_ids, self.rollouts, self.rewards, self.metrics,
                                      self.stopping, lambda: self.engine_version, envs=self.envs,
                                      renderer=self.renderer)
            if cfg.train.max_staleness:
                self.supply = AsyncRolloutSupply(self._new_scheduler(), self.maker,
                                                 staleness=cfg.train.max_staleness, last_step=cfg.train.steps - 1)
            else:
                self.supply = RolloutSupply(self._new_scheduler(), self.maker)
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
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tokens = datasets.tokenize(data, self.tokenizer, chat_template=self.cfg.model.chat_template,
                                   model=self.model_path)
        self.renderer = tokens.renderer
        self.prompt_ids, self.expert_rows = tokens.prompts, tokens.expert
        self.evaluator = Evaluator([EvalSet(name, rows, tokens.eval_sets[name])
                                    for name, rows in data.eval_sets.items()],
                                   max_new_tokens=self.cfg.rollout.max_new_tokens,
                                   samples=self.cfg.train.eval_samples, seed=self.cfg.train.seed)

    @property
    def scheduler(self) -> Scheduler:
        """The data cursors and mu schedule (the supply plans the steps with it)."""
        return self.supply.scheduler

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.cfg.algo, self.cfg.rollout.n, len(self.prompts), len(self.expert), self.cfg.train.seed)

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
        log.info(pools.describe_threads(self.cfg))
        self.learners, self.critic = pools.start_learners(self.cfg, self.model_path)
        self.references, self.rollouts, self.rewards = pools.start_pools(self.cfg, self.model_path, self.sync_dir)
        self.envs = pools.start_envs(self.cfg)
        for group in (self.rollouts, self.rewards, self.envs):  # their waits end when the run is asked to stop
            if group is not None:
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
                initial = self.supply.on_engines(self.evaluate)
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
                    record.update(self.supply.on_engines(self.evaluate))
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
            final = self.supply.on_engines(self.evaluate)
        except Interrupted:  # stopped during the final evaluation: every step is trained
            raise Stopped(step, self.checkpoint(step, "sigterm")) from None
        self.supply.finish()  # async: every queued weight load ran before the final evaluation; none failed
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

    def _next_step(self, step: int) -> dict:
        rollouts, waited = self.supply.rollouts(step)  # plan, generate, score (async: made ahead, waited for)
        return self._learn(rollouts, rollout_wait=waited)

    def step(self, plan: StepPlan) -> dict:
        """One synchronous step on ``plan`` (generate, score, train, sync); returns its metrics.jsonl record."""
        return self._learn(self.maker(plan))

    def _learn(self, rollouts: Rollouts, rollout_wait: float | None = None) -> dict:
        """Train on one step's rollouts and hand the new policy to the engines; returns the step's record (also
        exported to Prometheus). ``rollout_wait``: the seconds async mode waited for the rollouts (None: they were
        made inside this step)."""
        t0 = time.perf_counter()
        batch = self._batch(rollouts)  # advantages; reference and recomputed log-probabilities; the expert rows
        train = self._train(batch, rollouts.plan)  # epochs x mini-batches on the learners, the critic alongside
        t1 = time.perf_counter()
        sync_bytes = self._sync()  # learner rank 0 -> every engine (async: queued behind the rollouts being made)
        t2 = time.perf_counter()
        record = self._record(rollouts, train, sync_bytes, train_s=t1 - t0, sync_s=t2 - t1, rollout_wait=rollout_wait)
        self.metrics.observe_step(record)
        self._collect_counts()
        return record

    def _record(self, rollouts: Rollouts, train: dict, sync_bytes: int, *, train_s: float, sync_s: float,
                rollout_wait: float | None) -> dict:
        """The step's metrics.jsonl line: what it trained on, the learners' metrics, and where its time went."""
        plan, rl_rows = rollouts.plan, rollouts.rows
        phase = dict.fromkeys(STEP_PHASES, 0.0)
        phase.update(rollouts.phase, train=train_s, sync=sync_s)
        total = train_s + sync_s
        if rollout_wait is None:  # synchronous: the rollout phases are part of the step
            total += sum(rollouts.phase.get(k, 0.0) for k in ("generate", "env", "reward"))
            phase["other"] = max(0.0, total - sum(phase.values()))
        else:  # async: they overlapped the previous step's training; the step waited only `rollout_wait`
            total += rollout_wait
            phase["other"] = max(0.0, total - rollout_wait - train_s - sync_s)
        record = {"step": plan.step, "mu": plan.mu, "reward_mean": rollouts.reward_mean,
                  **{k: train.get(k) for k in STEP_METRICS},
                  "optimizer_steps": train["optimizer_steps"], "policy_lag": plan.step - rollouts.version,
                  "samples": len(rl_rows),  # tokens the engines generated (an episode's observations are not)
                  "tokens": sum(len(c.token_ids) if c.loss_mask is None else sum(c.loss_mask) for _, c in rl_rows),
                  "dropped_groups": len(rollouts.dropped), "filtered_groups": rollouts.filtered,
                  "sample_rounds": rollouts.rounds,
                  "truncated_rows": sum(c.finish_reason == "length" for _, c in rl_rows),
                  "expert_rows": len(plan.expert_ids), "weight_sync_bytes": sync_bytes,
                  "step_seconds": total, **{f"{k}_seconds": v for k, v in phase.items()}}
        if rollout_wait is not None:
            record["rollout_wait_seconds"] = rollout_wait
        record.update({f"reward/{name}": value for name, value in rollouts.reward_components.items()})
        if rl_rows:
            record["response_tokens_mean"] = record["tokens"] / len(rl_rows)
        record.update(episode_metrics([c for _, c in rl_rows]))
        return record

    def _collect_counts(self) -> None:
        """Restarts and deadline kills of the pools Ray restarts, into their counters (after each step, before each
        checkpoint)."""
        for group in (self.rollouts, self.rewards, self.references, self.envs):
            if group is not None:
                restarts, deadlines = group.take_counts()
                self.metrics.restarts.labels(group.role).inc(restarts)
                self.metrics.deadlines.labels(group.role).inc(deadlines)

    def _batch(self, rollouts: Rollouts) -> TrainBatch:
        """The step's rows: on-policy rows with per-token advantages (and reference log-probabilities, the learner's
        recomputed log-probabilities, critic values and returns where the algorithm uses them), then the expert
        rows."""
        a, plan = self.cfg.algo, rollouts.plan
        rows = rollouts.rows
        lengths = [len(c.token_ids) for _, c in rows]
        rl = TrainBatch(input_ids=[p + c.token_ids for p, c in rows], prompt_lens=[len(p) for p, _ in rows],
                        old_logprobs=[c.logprobs for _, c in rows], advantages=[[0.0] * n for n in lengths],
                        is_expert=[False] * len(rows))
        if any(c.loss_mask is not None for _, c in rows):  # multi-turn: the observations are not the model's
            rl.loss_mask = [c.loss_mask if c.loss_mask is not None else [1] * len(c.token_ids) for _, c in rows]
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
        zeros = [[0.0] * len(r) for _, r, _ in expert]
        if rl.loss_mask is not None or any(m is not None for _, _, m in expert):  # a conversation in the batch
            ones = [[1] * (len(x) - p) for x, p in zip(rl.input_ids, rl.prompt_lens)]
            rl.loss_mask = (rl.loss_mask or ones) + [[1] * len(r) if m is None else m for _, r, m in expert]
        rl.input_ids += [p + r for p, r, _ in expert]
        rl.prompt_lens += [len(p) for p, _, _ in expert]
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

        mask = padded(rl.loss_mask if rl.loss_mask is not None else [[1.0] * n for n in lengths])
        values = None
        if needs_critic(a.advantage):
            rl.old_values = self._per_rank(self.critic, rl, lambda actor, b: actor.values.remote(b))
            values = padded(rl.old_values)
        token_rewards = None
        if a.kl_penalty == "reward" and rl.ref_logprobs is not None:
            token_rewards = kl_reward(padded(rl.old_logprobs), padded(rl.ref_logprobs), mask, coef=a.kl_coef,
                                      estimator=a.kl_estimator)
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

    def _sync(self) -> int:
        """A new policy version: learner rank 0 writes it, the engines load it (async: queued on the engine worker).
        Returns the bytes pushed to the engines."""
        self.version += 1
        path, nbytes = self._save_weights()
        self.supply.load_weights(self._load_weights, path)
        return nbytes * len(self.rollouts)

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
        dtype = self.cfg.rollout.dtype or self.cfg.model.dtype  # the engines'
        nbytes = self.learners.all(lambda a: a.save_weights.remote(path, dtype))[0]
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
        results = flatten(self.evaluator.run(self.maker.rollout))
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
        if self.supply is not None:  # async: its worker's calls on actors fail once the actors are gone, and it ends
            self.supply.close()
            self.supply = None
        for name in ("rollouts", "rewards", "envs", "references", "critic", "learners"):
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
