"""The driver: set up the actor groups, run the synchronous CHORD loop, evaluate, write the run directory.

One step (DESIGN.md): plan -> generate (rollout actors) -> reward (reward actors) -> GRPO advantages ->
train (learner actors, CHORD loss) -> weight sync (learner rank 0 -> every engine) -> metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import ray
import torch

from actors.config import ChorusConfig, ConfigError, to_yaml
from actors.metrics import STEP_PHASES, JsonlLog, Metrics
from actors.scheduler import Scheduler, StepPlan
from learners.advantages import grpo_advantages
from learners.batch import TrainBatch, even_split, split_for_ranks
from rewards.registry import resolve
from rollout.data import load_rows, make_synthetic, write_jsonl
from rollout.tiny import ensure_model
from rollout.types import SamplingSpec

log = logging.getLogger("chorus")


def _chunks(items: list, k: int) -> list[list]:
    """At most ``k`` contiguous, near-equal, non-empty chunks (one per actor that has work)."""
    return even_split(items, max(1, min(k, len(items))))


class Trainer:
    def __init__(self, cfg: ChorusConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if (self.run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run dir {self.run_dir} already holds a run (metrics.jsonl); choose another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        for i, f in enumerate(cfg.reward.functions):  # fail before anything starts
            try:
                resolve(f.name)
            except KeyError as exc:
                raise ConfigError(f"config key 'reward.functions[{i}].name': {exc.args[0]}") from None
        try:
            self.model_path = ensure_model(cfg.model.path, cfg.model.build)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        self._load_data()
        self.scheduler = Scheduler(cfg.algo, cfg.rollout.n, len(self.prompts), len(self.expert), cfg.train.seed)
        # Everything below holds a resource (a port, a file, shared memory, processes): close() releases what
        # was started, whatever failed.
        self.metrics = self.log = self.sync_dir = None
        self.learners = self.rollouts = self.rewards = None
        self.own_ray = False
        try:
            self.metrics = Metrics(cfg.metrics.host, cfg.metrics.port)
            for f in cfg.reward.functions:  # export zeros from the start, not only after a first failure
                self.metrics.reward_failures.labels(f.name)
                self.metrics.reward.labels(f.name)
            (self.run_dir / "metrics_url").write_text(self.metrics.url + "\n")
            self.log = JsonlLog(self.run_dir / "metrics.jsonl")
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # weight hand-off in memory, not on disk
            self.sync_dir = Path(tempfile.mkdtemp(prefix="chorus-sync-", dir=shm))
            self.weights_path = self.sync_dir / "weights.safetensors"
            self._start_ray()
            self._start_actors()
        except BaseException:
            self.close()
            raise

    # --- setup ------------------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg.data
        paths = {"prompts": cfg.prompts, "expert": cfg.expert, "eval": cfg.eval}
        if cfg.synthetic is not None:
            generated = make_synthetic(**asdict(cfg.synthetic))
            for kind, rows in generated.items():
                paths[kind] = str(self.run_dir / "data" / f"{kind}.jsonl")
                write_jsonl(Path(paths[kind]), rows)
        self.prompts = load_rows(paths["prompts"], "prompts")
        self.eval_rows = load_rows(paths["eval"], "eval")
        self.expert = load_rows(paths["expert"], "expert") if paths["expert"] else []
        if self.cfg.train.eval_max_rows:
            self.eval_rows = self.eval_rows[: self.cfg.train.eval_max_rows]
        self.tokenizer = tok = AutoTokenizer.from_pretrained(self.model_path)
        self.prompt_ids = [tok(r["prompt"]).input_ids for r in self.prompts]
        self.eval_ids = [tok(r["prompt"]).input_ids for r in self.eval_rows]
        self.expert_rows = [
            (tok(r["prompt"]).input_ids, tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id])
            for r in self.expert
        ]

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
        from actors.group import ActorGroup
        from learners.learner import LearnerActor
        from rewards.actor import RewardActor
        from rollout.engine import RolloutActor

        cfg = self.cfg
        gpu = ray.cluster_resources().get("GPU", 0) > 0  # the driver may run on a node without GPUs
        # vLLM warns on every weight reload that the rotary embedding has no weights to load (it has none to
        # train either): at WARNING that is one line per step, so engines log errors only.
        base_env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR",
                    "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        lc = cfg.learner
        self.learners = ActorGroup(
            "learner", LearnerActor, lc.num_actors,
            {"CPU": lc.num_cpus, "GPU": lc.num_gpus if lc.num_gpus is not None else float(gpu)},
            lambda rank: dict(model_path=self.model_path, cfg=lc, algo=cfg.algo, dtype=cfg.model.dtype,
                              seed=cfg.train.seed, rank=rank, world_size=lc.num_actors),
            env={**base_env, "OMP_NUM_THREADS": str(lc.num_threads)},
        )
        addr, port = self.learners.all(lambda a: a.address.remote())[0]  # rank 0's node hosts the rendezvous
        self.learners.all(lambda a: a.setup.remote(addr, port))
        rc = cfg.rollout
        self.rollouts = ActorGroup(
            "rollout", RolloutActor, rc.num_actors,
            {"CPU": rc.num_cpus, "GPU": rc.tensor_parallel_size if gpu else 0},
            lambda rank: dict(backend=rc.backend, model_path=self.model_path, weights_path=str(self.weights_path),
                              num_threads=rc.num_threads,
                              dtype=cfg.model.dtype, seed=cfg.train.seed + rank, max_model_len=rc.max_model_len,
                              tensor_parallel_size=rc.tensor_parallel_size, kv_cache_gib=rc.kv_cache_gib,
                              gpu_memory_utilization=rc.gpu_memory_utilization),
            env={**base_env, "OMP_NUM_THREADS": str(rc.num_threads)}, max_restarts=3, retries=3,
        )
        self.rewards = ActorGroup(
            "reward", RewardActor, cfg.reward.num_actors, {"CPU": cfg.reward.num_cpus},
            lambda rank: dict(cfg=cfg.reward), env=base_env, max_restarts=3, retries=3,
        )

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg.train
        start = time.perf_counter()
        accuracy = None
        bar = tqdm(range(cfg.steps), desc="train", unit="step", dynamic_ncols=True, disable=None)  # off without a tty
        for step in bar:
            record = self.step(self.scheduler.plan(step))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                t = time.perf_counter()
                accuracy = record["eval_accuracy"] = self.evaluate()
                record["eval_seconds"] = time.perf_counter() - t
            self.log.write(record)
            bar.write(self._console_line(record))
        final = self.evaluate()
        self.log.write({"step": cfg.steps, "eval_accuracy": final, "final": True})
        self.learners.all(lambda a: a.save_pretrained.remote(str(self.run_dir / "final"), self.model_path))
        summary = {"steps": cfg.steps, "final_eval_accuracy": final, "last_periodic_eval_accuracy": accuracy,
                   "wall_seconds": time.perf_counter() - start, "metrics_url": self.metrics.url,
                   "model": str(self.run_dir / "final")}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def step(self, plan: StepPlan) -> dict:
        """One synchronous step; returns its metrics.jsonl record (also exported to Prometheus)."""
        phase = dict.fromkeys(STEP_PHASES, 0.0)
        t_step = time.perf_counter()
        rl_rows, rewards, scored = self._rollouts(plan, phase)
        batch = self._batch(plan, rl_rows, rewards)
        t = time.perf_counter()
        train = self._train(batch, plan.mu)
        phase["train"] = time.perf_counter() - t
        t = time.perf_counter()
        sync_bytes = self.sync_weights()
        phase["sync"] = time.perf_counter() - t
        total = time.perf_counter() - t_step
        phase["other"] = max(0.0, total - sum(phase.values()))

        record = {"step": plan.step, "mu": plan.mu, "reward_mean": float(rewards.mean()) if len(rewards) else None,
                  **{k: train[k] for k in ("loss", "rl_loss", "sft_loss", "kl", "entropy", "clip_frac",
                                           "grad_norm", "lr")},
                  "samples": len(rl_rows), "tokens": sum(len(c.token_ids) for _, c in rl_rows),
                  "expert_rows": len(plan.expert_ids), "weight_sync_bytes": sync_bytes, "step_seconds": total,
                  **{f"{k}_seconds": v for k, v in phase.items()}}
        if scored:
            for name in scored[0].components:
                record[f"reward/{name}"] = sum(s.components[name] for s in scored) / len(scored)
            record["response_tokens_mean"] = record["tokens"] / len(rl_rows)
        self.metrics.observe_step(record)
        for group in (self.rollouts, self.rewards):
            self.metrics.restarts.labels(group.role).inc(group.take_restarts())
        return record

    def _rollouts(self, plan: StepPlan, phase: dict):
        """Generate and score the step's on-policy rows: [(prompt_ids, completion)], rewards [B*n], scores."""
        if not plan.prompt_ids:
            return [], torch.zeros(0), []
        rc = self.cfg.rollout
        spec = SamplingSpec(n=rc.n, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p)
        t = time.perf_counter()
        completions = self._generate([self.prompt_ids[i] for i in plan.prompt_ids], spec)
        phase["generate"] = time.perf_counter() - t
        rows = [self.prompts[plan.prompt_ids[c.prompt_index]] for c in completions]
        t = time.perf_counter()
        scored = self._score(rows, [c.text for c in completions])
        phase["reward"] = time.perf_counter() - t
        rewards = torch.tensor([s.total for s in scored])
        rl_rows = [(self.prompt_ids[plan.prompt_ids[c.prompt_index]], c) for c in completions]
        return rl_rows, rewards, scored

    def _generate(self, prompts: list[list[int]], spec: SamplingSpec):
        shards = _chunks(list(range(len(prompts))), len(self.rollouts))
        results = self.rollouts.map(lambda a, shard: a.generate.remote([prompts[i] for i in shard], spec), shards,
                                    on_pending=self.metrics.queue.labels("rollout").set)
        completions = []
        for shard, (out, _) in zip(shards, results):
            for c in out:
                c.prompt_index = shard[c.prompt_index]  # shard-local -> request-global
                completions.append(c)
        return completions

    def _score(self, rows: list[dict], responses: list[str]):
        idx = _chunks(list(range(len(rows))), len(self.rewards))
        results = self.rewards.map(
            lambda a, s: a.score.remote([rows[i]["prompt"] for i in s], [responses[i] for i in s], [rows[i] for i in s]),
            idx, on_pending=self.metrics.queue.labels("reward").set)
        scored = [s for out, _ in results for s in out]
        for i, s in enumerate(scored):
            for name in s.failed:
                self.metrics.reward_failures.labels(name).inc()
                log.warning("reward '%s' failed on prompt %r; fallback score used", name, rows[i]["prompt"])
        return scored

    def _batch(self, plan: StepPlan, rl_rows, rewards: torch.Tensor) -> TrainBatch:
        a = self.cfg.algo
        adv = grpo_advantages(rewards, self.cfg.rollout.n, std_normalize=a.adv_std_normalize).tolist() \
            if rl_rows else []
        batch = TrainBatch([], [], [], [], [])
        for (prompt, c), advantage in zip(rl_rows, adv):
            batch.input_ids.append(prompt + c.token_ids)
            batch.prompt_lens.append(len(prompt))
            batch.old_logprobs.append(c.logprobs)
            batch.advantages.append(advantage)
            batch.is_expert.append(False)
        for i in plan.expert_ids:
            prompt, response = self.expert_rows[i]
            batch.input_ids.append(prompt + response)
            batch.prompt_lens.append(len(prompt))
            batch.old_logprobs.append([0.0] * len(response))
            batch.advantages.append(0.0)
            batch.is_expert.append(True)
        return batch

    def _train(self, batch: TrainBatch, mu: float) -> dict:
        world = len(self.learners)
        n_rl, n_sft = batch.token_counts()
        shards = split_for_ranks(batch, world, self.cfg.learner.micro_batch_size)
        self.metrics.queue.labels("learner").set(world)
        results = self.learners.map(
            lambda actor, micro_batches: actor.train_step.remote(micro_batches, mu=mu, n_rl_tokens=n_rl,
                                                                 n_sft_tokens=n_sft), shards)
        self.metrics.queue.labels("learner").set(0)
        out = {k: sum(r[k] for r in results) for k in results[0]}  # per-rank partial sums of global means
        for k in ("grad_norm", "lr"):
            out[k] = results[0][k]
        return out

    def sync_weights(self) -> int:
        """Learner rank 0 writes the weights to shared memory; every engine loads them in place. An engine that
        Ray restarts loads the same file when it starts (``RolloutActor(weights_path=...)``), so it never
        generates with stale weights.

        The file is node-local: engines on other nodes than learner rank 0 cannot read it (multi-node sync by
        NCCL broadcast is designed with the GPU work, not here)."""
        path = str(self.weights_path)
        t = time.perf_counter()
        nbytes = self.learners.all(lambda a: a.save_weights.remote(path))[0]
        self.rollouts.map(lambda a, p: a.load_weights.remote(p), [path] * len(self.rollouts))
        self.metrics.sync_seconds.set(time.perf_counter() - t)
        self.metrics.sync_bytes.inc(nbytes * len(self.rollouts))
        return nbytes * len(self.rollouts)

    def evaluate(self) -> float:
        """Greedy generation on the held-out set through the rollout engines; accuracy = exact-match rate."""
        t = time.perf_counter()
        spec = SamplingSpec(n=1, max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0)
        completions = sorted(self._generate(self.eval_ids, spec), key=lambda c: c.prompt_index)  # one per row
        exact = resolve("exact_match")
        hits = exact([r["prompt"] for r in self.eval_rows], [c.text for c in completions],
                     answer=[r["answer"] for r in self.eval_rows])
        accuracy = sum(hits) / len(hits)
        self.metrics.observe_eval(accuracy, time.perf_counter() - t)
        return accuracy

    def _console_line(self, r: dict) -> str:
        reward = "   -  " if r["reward_mean"] is None else f"{r['reward_mean']:.3f}"
        line = (f"step {r['step']:>4}  reward {reward}  loss {r['loss']:.4f} (rl {r['rl_loss']:.4f} "
                f"sft {r['sft_loss']:.4f})  mu {r['mu']:.3f}  {r['step_seconds']:.2f}s")
        if "eval_accuracy" in r:
            line += f"  eval_acc {r['eval_accuracy']:.3f}"
        return line

    def close(self) -> None:
        """Stop everything this trainer started; safe to call twice."""
        for name in ("rollouts", "rewards", "learners"):
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
