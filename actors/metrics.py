"""Prometheus metrics served by the driver, and the run directory's metrics.jsonl.

Names follow Prometheus conventions: ``chorus_`` prefix, base units, ``_total`` on counters, ``_seconds`` on
durations. The README's metrics table lists each one; tests scrape the endpoint over HTTP and check the names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from actors.evaluation import nest

log = logging.getLogger("chorus")

STEP_PHASES = ("generate", "env", "reward", "train", "sync", "other")  # a training step's wall time, split
PHASES = (*STEP_PHASES, "eval")


class Metrics:
    def __init__(self, host: str, port: int):
        r = self.registry = CollectorRegistry()
        self.step = Gauge("chorus_step", "Optimiser steps completed", registry=r)
        self.samples = Counter("chorus_samples_generated_total", "Responses generated for training", registry=r)
        self.tokens = Counter("chorus_tokens_generated_total", "Response tokens generated for training", registry=r)
        self.expert_rows = Counter("chorus_expert_rows_total", "Expert demonstration rows trained on", registry=r)
        self.reward = Gauge("chorus_reward_mean", "Mean reward of the step's responses, per component "
                            "(component=\"total\" is the weighted sum)", ["component"], registry=r)
        self.loss = Gauge("chorus_loss", "Loss of the step by kind (rl, sft, total; value: the critic's)", ["kind"],
                          registry=r)
        self.mu = Gauge("chorus_mu", "CHORD weight of the SFT term", registry=r)
        self.kl = Gauge("chorus_kl", "k3 estimate of KL(behaviour policy || current policy) on RL tokens", registry=r)
        self.ref_kl = Gauge("chorus_ref_kl", "Estimate (algo.kl_estimator) of KL(policy || reference) on RL tokens, "
                            "with a reference model", registry=r)
        self.value_clip_frac = Gauge("chorus_value_clip_fraction", "Share of RL tokens whose critic update was "
                                     "clipped (PPO)", registry=r)
        self.policy_lag = Gauge("chorus_policy_lag_steps", "Policy versions between the weights that generated the "
                                "step's rollouts and the learner's (0 in synchronous mode)", registry=r)
        self.rollout_wait = Gauge("chorus_rollout_wait_seconds", "Seconds the learner waited for the step's rollouts "
                                  "(async mode; 0 when generation is fully hidden)", registry=r)
        self.optimizer_steps = Counter("chorus_optimizer_steps_total", "Optimiser steps of the policy "
                                       "(epochs x mini-batches per training step)", registry=r)
        self.entropy = Gauge("chorus_entropy", "Mean token entropy of the policy on RL tokens (nats)", registry=r)
        self.clip_frac = Gauge("chorus_clip_fraction", "Share of RL tokens whose ratio was clipped", registry=r)
        self.grad_norm = Gauge("chorus_grad_norm", "Global gradient norm before clipping", registry=r)
        self.lr = Gauge("chorus_learning_rate", "Learning rate", registry=r)
        self.response_len = Gauge("chorus_response_length_tokens", "Mean response length (tokens)", registry=r)
        self.eval_accuracy = Gauge("chorus_eval_accuracy", "Held-out accuracy of greedy generation, per set (target, "
                                   "and each retention set)", ["set"], registry=r)
        self.eval_pass = Gauge("chorus_eval_pass_at_k", "Held-out pass@k from train.eval_samples samples per row at "
                               "temperature 1, per set", ["set", "k"], registry=r)
        self.eval_tokens = Gauge("chorus_eval_response_length_tokens", "Mean greedy response length on a held-out "
                                 "set (tokens)", ["set"], registry=r)
        self.phase = Gauge("chorus_step_phase_seconds", "Seconds the last step spent in each phase", ["phase"],
                           registry=r)
        self.phase_total = Counter("chorus_phase_seconds_total", "Seconds spent in each phase", ["phase"],
                                   registry=r)
        self.step_seconds = Gauge("chorus_step_seconds", "Wall time of the last step", registry=r)
        self.queue = Gauge("chorus_queue_depth", "Requests in flight per actor pool", ["pool"], registry=r)
        self.restarts = Counter("chorus_actor_restarts_total", "Actors restarted (rollout, reward, reference: by Ray, "
                                "their work retried; learner, critic: the group restarted from the last checkpoint)",
                                ["role"], registry=r)
        self.deadlines = Counter("chorus_deadline_exceeded_total", "Actor calls killed past their deadline "
                                 "(<role>.deadline_s)", ["role"], registry=r)
        self.checkpoint_step = Gauge("chorus_checkpoint_step", "Training steps the newest complete checkpoint holds "
                                     "(0 = none yet)", registry=r)
        self.checkpoint_time = Gauge("chorus_checkpoint_timestamp_seconds", "Unix time the newest complete "
                                     "checkpoint was written", registry=r)
        self.checkpoint_seconds = Gauge("chorus_checkpoint_seconds", "Seconds the last checkpoint took to write",
                                        registry=r)
        self.reward_failures = Counter("chorus_reward_failures_total", "Reward calls that raised, timed out or "
                                       "returned NaN/None, per sample", ["reward"], registry=r)
        self.dropped_groups = Counter("chorus_reward_dropped_groups_total", "Prompt groups left out of a step because "
                                      "a reward failed on one of their samples (reward.on_failure = drop_group)",
                                      registry=r)
        self.skipped_rows = Counter("chorus_data_rows_skipped_total", "Malformed data rows left out at start "
                                    "(data.on_bad_row = skip), per data set", ["dataset"], registry=r)
        self.sync_bytes = Counter("chorus_weight_sync_bytes_total", "Bytes of weights pushed to rollout engines",
                                  registry=r)
        self.sync_seconds = Gauge("chorus_weight_sync_seconds", "Seconds of the last weight sync", registry=r)
        self._rl_core(r)
        self._envs(r)
        for phase in PHASES:
            self.phase.labels(phase)
            self.phase_total.labels(phase)
        for pool in ("rollout", "reward", "learner"):
            self.queue.labels(pool)
        for role in ("rollout", "reward", "env", "reference", "learner", "critic"):
            self.restarts.labels(role)
            self.deadlines.labels(role)
        for kind in ("rl", "sft", "total", "value"):
            self.loss.labels(kind)
        self.server, self.thread = start_http_server(port, addr=host, registry=r)
        self.host, self.port = host, self.server.server_port

    def _rl_core(self, r: CollectorRegistry) -> None:
        """The RL core's own gauges: the dual clip, the engine/learner mismatch, dynamic sampling, truncation."""
        self.dual_clip_frac = Gauge("chorus_dual_clip_fraction", "Share of RL tokens whose loss the dual clip capped "
                                    "(A < 0, ratio far above 1; algo.dual_clip)", registry=r)
        self.mismatch_kl = Gauge("chorus_mismatch_kl", "k3 estimate of KL(engine policy || learner policy) on RL "
                                 "tokens (algo.recompute_logprobs): the same weights in synchronous mode; in async "
                                 "mode the engine's are policy_lag versions older", registry=r)
        self.is_ratio = Gauge("chorus_is_ratio_mean", "Mean importance ratio learner / engine probability of the RL "
                              "tokens (algo.recompute_logprobs)", registry=r)
        self.is_weight = Gauge("chorus_is_weight_mean", "Mean weight algo.is_correction gave the RL tokens", registry=r)
        self.is_outside = Gauge("chorus_is_outside_fraction", "Share of RL tokens whose importance ratio (level=token) "
                                "or whose sequence's ratio (level=seq) is outside [1/is_cap, is_cap]: truncated or "
                                "masked by the matching algo.is_correction", ["level"], registry=r)
        for level in ("token", "seq"):
            self.is_outside.labels(level)
        self.filtered_groups = Counter("chorus_filtered_groups_total", "Prompt groups left out of a step because "
                                       "their rewards were all equal (algo.dynamic_sampling)", registry=r)
        self.sample_rounds = Gauge("chorus_sample_rounds", "Generation rounds the last step took to fill its groups "
                                   "(1 without algo.dynamic_sampling)", registry=r)
        self.truncated = Counter("chorus_truncated_responses_total", "Responses trained on that hit "
                                 "rollout.max_new_tokens (left out of the loss with algo.overlong_filter)",
                                 registry=r)

    def _envs(self, r: CollectorRegistry) -> None:
        """Multi-turn episodes (env.name): what the environments did."""
        self.episodes = Counter("chorus_env_episodes_total", "Multi-turn episodes played for training (every sampling "
                                "round's, those of groups left out included)", registry=r)
        self.env_turns = Gauge("chorus_env_turns", "Mean model turns per episode of the last step", registry=r)
        self.env_return = Gauge("chorus_env_return", "Mean return (sum of the environment's step rewards) of the last "
                                "step's episodes", registry=r)
        self.env_turn_reward = Gauge("chorus_env_reward_per_turn", "Mean environment reward per step of the last "
                                     "step's episodes", registry=r)
        self.env_latency = Gauge("chorus_env_latency_seconds", "Mean seconds of one environment call (every running "
                                 "episode's turn, across the env actors) in the last step", registry=r)
        self.env_failures = Counter("chorus_env_failures_total", "Episodes whose environment raised, returned what "
                                    "it may not, hung past env.timeout_s or died (their reward: reward.fallback)",
                                    registry=r)
        self.env_events = Counter("chorus_env_events_total", "What environments counted in their info, summed over "
                                  "episodes (tools: tool_calls, tool_errors)", ["event"], registry=r)

    def observe_step(self, r: dict) -> None:
        """Export one step's record (the metrics.jsonl line) to the gauges and counters."""
        self.step.set(r["step"] + 1)
        self.mu.set(r["mu"])
        for kind, key in (("rl", "rl_loss"), ("sft", "sft_loss"), ("total", "loss"), ("value", "value_loss")):
            if r.get(key) is not None:
                self.loss.labels(kind).set(r[key])
        for gauge, key in ((self.kl, "kl"), (self.entropy, "entropy"), (self.clip_frac, "clip_frac"),
                           (self.grad_norm, "grad_norm"), (self.lr, "lr"), (self.step_seconds, "step_seconds"),
                           (self.ref_kl, "ref_kl"), (self.value_clip_frac, "value_clip_frac"),
                           (self.policy_lag, "policy_lag"), (self.rollout_wait, "rollout_wait_seconds"),
                           (self.dual_clip_frac, "dual_clip_frac"), (self.mismatch_kl, "mismatch_kl"),
                           (self.is_ratio, "is_ratio"), (self.is_weight, "is_weight"),
                           (self.is_outside.labels("token"), "is_ratio_outside"),
                           (self.is_outside.labels("seq"), "is_seq_outside")):
            if r.get(key) is not None:
                gauge.set(r[key])
        self.optimizer_steps.inc(r["optimizer_steps"])
        self.samples.inc(r["samples"])
        self.tokens.inc(r["tokens"])
        self.expert_rows.inc(r["expert_rows"])
        self.dropped_groups.inc(r["dropped_groups"])
        self.filtered_groups.inc(r["filtered_groups"])
        self.truncated.inc(r["truncated_rows"])
        self.sample_rounds.set(r["sample_rounds"])
        if r["reward_mean"] is not None:
            self.reward.labels("total").set(r["reward_mean"])
        if r["samples"]:
            self.response_len.set(r["response_tokens_mean"])
        for key, value in r.items():
            if key.startswith("reward/"):
                self.reward.labels(key.split("/", 1)[1]).set(value)
        for phase in STEP_PHASES:
            self.phase.labels(phase).set(r[f"{phase}_seconds"])
            self.phase_total.labels(phase).inc(r[f"{phase}_seconds"])
        if r.get("episodes"):  # (chorus_env_episodes_total counts where episodes are played: actors/rollouts.py)
            for gauge, key in ((self.env_turns, "env/turns"), (self.env_return, "env/return"),
                               (self.env_turn_reward, "env/reward_per_turn"),
                               (self.env_latency, "env/latency_seconds")):
                if key in r:
                    gauge.set(r[key])
            for key, value in r.items():
                if key.startswith("env/info/"):
                    self.env_events.labels(key.removeprefix("env/info/")).inc(value * r["episodes"])

    def observe_eval(self, r: dict) -> None:
        """Export one evaluation (``eval/<set>/<metric>`` keys, actors/evaluation.py:flatten)."""
        for name, m in nest(r).items():
            for metric, value in m.items():
                if metric == "accuracy":
                    self.eval_accuracy.labels(name).set(value)
                elif metric == "response_tokens":
                    self.eval_tokens.labels(name).set(value)
                elif metric.startswith("pass@"):
                    self.eval_pass.labels(name, metric.removeprefix("pass@")).set(value)
        self.phase.labels("eval").set(r["eval_seconds"])
        self.phase_total.labels("eval").inc(r["eval_seconds"])

    def counters(self) -> list[list]:
        """Every counter's value, ``[[name, {labels}, value], ...]``: what a checkpoint keeps so that a resumed run's
        counters go on from where they were."""
        out = []
        for metric in self.registry.collect():
            if metric.type == "counter":
                out += [[s.name, s.labels, s.value] for s in metric.samples if s.name.endswith("_total")]
        return out

    def restore_counters(self, values: list[list]) -> None:
        """Add a checkpoint's counter values (on a fresh endpoint, where every counter is 0)."""
        by_name = {f"{c._name}_total": c for c in vars(self).values() if isinstance(c, Counter)}
        for name, labels, value in values:
            counter = by_name.get(name)
            if counter is not None and value:
                (counter.labels(**labels) if labels else counter).inc(value)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class JsonlLog:
    """One JSON object per step, appended and flushed so a crash loses at most the line being written.

    ``resume_step``: the run continues from a checkpoint of that many steps; the records of later steps (done after
    the checkpoint, and redone now) move to ``metrics.rolled_back.jsonl`` beside the log, so each step has one line.
    """

    def __init__(self, path: Path, resume_step: int | None = None, sinks: list | None = None):
        self.path = path
        self.sinks = list(sinks or [])  # actors/sinks.py: TensorBoard, W&B; each gets every record too
        if resume_step is None:
            self.f = path.open("x", encoding="utf-8")  # a run dir holds one run
        else:
            self.f = None
            self.rollback(resume_step)

    def rollback(self, step: int) -> int:
        """Keep the records of steps before ``step``; move the others (and a half-written last line) aside.
        Returns how many moved."""
        if self.f is not None:
            self.f.close()
        keep, moved = [], []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    ok = record["step"] < step and not record.get("final")
                except (ValueError, KeyError, TypeError):
                    ok = False
                (keep if ok else moved).append(line)
        if moved:
            with self.path.with_name("metrics.rolled_back.jsonl").open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in moved))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        tmp.replace(self.path)
        self.f = self.path.open("a", encoding="utf-8")
        return len(moved)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        for sink in list(self.sinks):  # an optional view: one that fails is logged and dropped, the run goes on
            try:
                sink.write(record)
            except Exception as exc:  # noqa: BLE001
                log.error("metrics sink %s failed (%s: %s); it gets no more records", type(sink).__name__,
                          type(exc).__name__, exc)
                self.sinks.remove(sink)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001  (the others must still be closed)
                log.warning("metrics sink %s: close failed: %s", type(sink).__name__, exc)
        self.sinks = []
