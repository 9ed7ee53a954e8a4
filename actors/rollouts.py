"""Making a step's rollouts: the engines generate ``rollout.n`` completions of each planned prompt (or, with an
environment, play ``rollout.n`` multi-turn episodes of it: ``actors/episodes.py``), the reward actors score them,
and groups that cannot teach anything leave the step (a failed reward with ``reward.on_failure = drop_group``;
all-equal rewards with ``algo.dynamic_sampling``, refilled by more prompts)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Callable

import torch

from actors.config import ChorusConfig
from actors.episodes import EnvGroup, Limits, play
from actors.group import ActorGroup, Interrupted
from actors.metrics import Metrics
from actors.records import Rollouts, StepPlan, component_means
from actors.scheduler import drop_failed_groups, uniform_groups
from learners.advantages import overlong_penalty
from learners.batch import even_split
from rollout.types import Completion, SamplingSpec, Scored

log = logging.getLogger("chorus")


def chunks(items: list, k: int) -> list[list]:
    """At most ``k`` contiguous, near-equal, non-empty chunks (one per actor that has work)."""
    return even_split(items, max(1, min(k, len(items))))


def generate(rollouts, prompts: list[list[int]], spec: SamplingSpec, on_pending=None) -> list[Completion]:
    """``spec.n`` completions of each prompt from the rollout group, the prompts dealt in contiguous shards; a
    completion's ``prompt_index`` indexes ``prompts``."""
    shards = chunks(list(range(len(prompts))), len(rollouts))

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


class RolloutMaker:
    """Makes :class:`Rollouts` from a :class:`StepPlan` on the run's engines (``rollouts``) and reward actors
    (``rewards``). ``engine_version()`` is the policy version the engines hold when the rollouts are made."""

    def __init__(self, cfg: ChorusConfig, prompts: list[dict], prompt_ids: list[list[int]], rollouts: ActorGroup,
                 rewards: ActorGroup, metrics: Metrics, stopping: threading.Event, engine_version: Callable[[], int],
                 *, envs: ActorGroup | None = None, renderer=None):
        self.cfg, self.prompts, self.prompt_ids = cfg, prompts, prompt_ids
        self.rollouts, self.rewards, self.metrics = rollouts, rewards, metrics
        self.stopping, self.engine_version = stopping, engine_version
        self.envs, self.renderer = (EnvGroup(envs) if envs is not None else None), renderer
        self.limits = Limits.of(cfg)

    def __call__(self, plan: StepPlan) -> Rollouts:
        """Generate and score the step's on-policy rows (none when mu = 1), prompt-major in groups of rollout.n.

        Groups leave the step before advantages: with ``reward.on_failure = drop_group`` those whose reward failed on
        any sample; with ``algo.dynamic_sampling`` (DAPO) those whose rewards are all equal, which carry no GRPO signal,
        and more prompts are sampled in further rounds (up to ``algo.max_sample_rounds``) until the step has
        ``prompts_per_step`` groups. The extra prompts of round r are drawn by (seed, step, r) from the prompts the step
        has not sampled yet, not from the data cursor, so a resumed run draws the same ones and async mode's planning
        ahead cannot change them. ``reward_mean`` and ``reward_components`` are over every row sampled, those of the
        groups left out included: the policy's reward, which filtering would inflate."""
        if self.stopping.is_set():
            raise Interrupted("rollouts")
        version, phase = self.engine_version(), {}
        if not plan.prompt_ids:
            return Rollouts(plan, [], torch.zeros(0), [], version, phase)
        a, n, want = self.cfg.algo, self.cfg.rollout.n, len(plan.prompt_ids)
        rows: list[tuple[list[int], Completion]] = []
        scored: list[Scored] = []
        dropped, filtered, rounds, prompt_ids = [], 0, 0, plan.prompt_ids
        sampled: list[Scored] = []
        used = set(prompt_ids)
        while True:
            got_rows, got_scored, got_dropped = self._sample_groups(plan.step, rounds, prompt_ids, phase)
            rounds += 1
            dropped += got_dropped
            sampled += got_scored
            if a.dynamic_sampling:
                # the task's reward decides, not the overlong penalty: a group all wrong but of several lengths has
                # no signal about the task, and GRPO's std normalisation would blow its length gaps up to +-1
                uniform = set(uniform_groups(got_scored, n, key=lambda s: s.total - s.components.get("overlong", 0.0)))
                filtered += len(uniform)
                keep = [i for i in range(len(got_rows)) if i // n not in uniform][: (want - len(rows) // n) * n]
                got_rows, got_scored = [got_rows[i] for i in keep], [got_scored[i] for i in keep]
            rows += got_rows
            scored += got_scored
            if not a.dynamic_sampling or len(rows) >= want * n or rounds >= a.max_sample_rounds:
                break
            fresh = [i for i in range(len(self.prompts)) if i not in used]
            if not fresh:
                break
            extra = random.Random(f"chorus-refill-{self.cfg.train.seed}-{plan.step}-{rounds}")
            prompt_ids = extra.sample(fresh, min(want, len(fresh)))
            used.update(prompt_ids)
        if a.dynamic_sampling and len(rows) < want * n:
            log.warning("step %d: %d of %d prompt groups with a reward spread after %d sampling rounds "
                        "(algo.max_sample_rounds); training on those", plan.step, len(rows) // n, want, rounds)
        rewards = torch.tensor([s.total for s in scored])
        return Rollouts(plan, rows, rewards, scored, version, phase, dropped, filtered=filtered, rounds=rounds,
                        reward_mean=sum(s.total for s in sampled) / len(sampled) if sampled else None,
                        reward_components=component_means(sampled))

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
        rows = [self.prompts[i] for i in prompt_ids]
        completions = self.rollout(rows, [self.prompt_ids[i] for i in prompt_ids], spec)
        env_seconds = sum(c.episode["env_seconds"] for c in completions if c.episode)
        phase["generate"] = phase.get("generate", 0.0) + time.perf_counter() - t - env_seconds
        if self.envs is not None:
            phase["env"] = phase.get("env", 0.0) + env_seconds
        rows = [rows[c.prompt_index] for c in completions]
        t = time.perf_counter()
        scored = self.score(rows, [c.text for c in completions])
        if self.envs is not None:
            self._add_returns(scored, completions)
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
        return [((c.episode or {}).get("prompt_ids") or self.prompt_ids[prompt_ids[c.prompt_index]], c)
                for c in completions], scored, dropped

    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        """``spec.n`` completions of each prompt from the engines (one turn)."""
        return generate(self.rollouts, prompts, spec, on_pending=self.metrics.queue.labels("rollout").set)

    def rollout(self, rows: list[dict], prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        """``spec.n`` rollouts of each prompt (``rows`` are their data rows): one turn each, or with an environment
        a multi-turn episode each. What training and evaluations generate with."""
        if self.envs is None:
            return self.sample(prompts, spec)
        return play(self.sample, self.envs, rows, prompts, spec, self.renderer, self.limits)

    def _add_returns(self, scored: list[Scored], completions: list[Completion]) -> None:
        """Each episode's return (the sum of its step rewards) as the reward component ``env``, weighted by
        ``env.reward_weight``; an episode whose environment failed gets ``reward.fallback`` and counts as a failure
        of ``env`` (logged once a step)."""
        failed = [c.episode["error"] for c in completions if c.episode["error"]]
        for s, c in zip(scored, completions):
            value = c.episode["return"]
            if c.episode["error"]:
                s.failed.append("env")
                value = self.cfg.reward.fallback
            s.components["env"] = value
            s.total += self.cfg.env.reward_weight * value
        self.metrics.episodes.inc(len(completions))  # every episode played, as the failures: their ratio is a rate
        self.metrics.env_failures.inc(len(failed))
        if failed:
            outcome = ("their groups are dropped" if self.cfg.reward.on_failure == "drop_group"
                       else "fallback score used")
            log.warning("environment failed %d of %d episodes (%s); the first: %s", len(failed), len(completions),
                        outcome, failed[0])

    def score(self, rows: list[dict], responses: list[str]) -> list[Scored]:
        """The reward actors' scores of ``responses`` to ``rows``; failures counted and logged once per reward."""
        if not self.cfg.reward.functions:  # an environment's return is the whole reward
            return [Scored(total=0.0) for _ in responses]
        idx = chunks(list(range(len(rows))), len(self.rewards))
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
