"""Held-out evaluation: accuracy per set (the target and each retention set), pass@k from k samples, response length.

A run evaluates on named sets: ``target`` (``data.eval``) and one per retention set (``data.retention``, or the
families of ``data.tasks.eval`` after the first). Each evaluation generates, through the rollout engines:

- one greedy response per row: ``accuracy`` (exact match with the row's ``answer``) and ``response_tokens`` (mean
  tokens of the response, the end-of-sequence token included when it was generated);
- on the target set, with ``train.eval_samples`` = n > 0, n samples per row at temperature 1 from a fixed seed:
  ``pass@1`` (the share of correct samples) and ``pass@n`` (the share of rows with a correct sample), the unbiased
  estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1) at k = n. The retention
  sets are scored greedily only: what they measure is whether a skill is kept, and sampling them would multiply
  the evaluation's cost by n + 1.

With an environment (``env.name``) each response is a multi-turn episode whose last model turn is scored, and each
set also gets the episodes' ``turns``, ``return``, ``env_failures`` and the environment's info counters per episode
(``tool_calls``, ...).

No Ray here: ``generate(rows, prompt_ids, spec)`` is the driver's (or ``chorus eval``'s) call into the engines.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from rollout.types import Completion, SamplingSpec

TARGET = "target"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them correct, is
    correct: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalSet:
    name: str
    rows: list[dict]  # each with "prompt" and "answer"
    ids: list[list[int]]  # the prompts' token ids


def _generated(c: Completion) -> int:
    """The tokens the engine generated: an episode's observations are not counted."""
    return len(c.token_ids) if c.loss_mask is None else sum(c.loss_mask)


def _correct(response: str, answer: str) -> bool:
    from rewards.rules import exact_match

    return exact_match([""], [response], answer=[answer])[0] == 1.0


class Evaluator:
    """Evaluates a policy, through ``generate``, on every set; the first set is the target."""

    def __init__(self, sets: list[EvalSet], *, max_new_tokens: int, samples: int = 0, seed: int = 0):
        self.sets, self.max_new_tokens, self.samples = sets, max_new_tokens, samples
        # one seed for every evaluation of a run: the sampled metrics of two evaluations differ by the policy only
        self.seed = random.Random(f"chorus-eval-{seed}").getrandbits(48)

    def run(self, generate) -> dict[str, dict[str, float]]:
        """``{set: {"accuracy", "response_tokens"[, "pass@1", "pass@<n>"][, episode metrics]}}`` and ``"seconds"``
        under ``""``."""
        from actors.episodes import episode_metrics

        t = time.perf_counter()
        rows = [r for s in self.sets for r in s.rows]
        prompts = [ids for s in self.sets for ids in s.ids]
        greedy = self._by_row(generate(rows, prompts, SamplingSpec(n=1, max_new_tokens=self.max_new_tokens,
                                                                     temperature=0.0)), len(prompts), 1)
        sampled = None
        if self.samples:  # the target set's rows come first
            spec = SamplingSpec(n=self.samples, max_new_tokens=self.max_new_tokens, temperature=1.0, seed=self.seed)
            target = self.sets[0]
            sampled = self._by_row(generate(target.rows, target.ids, spec), len(target.ids), self.samples)
        out: dict[str, dict[str, float]] = {}
        start = 0
        for s in self.sets:
            rows = range(start, start + len(s.rows))
            start += len(s.rows)
            answers = [r["answer"] for r in s.rows]
            hits = [_correct(greedy[i][0].text, a) for i, a in zip(rows, answers)]
            m = {"accuracy": sum(hits) / len(hits),
                 "response_tokens": sum(_generated(greedy[i][0]) for i in rows) / len(hits)}
            episodes = episode_metrics([greedy[i][0] for i in rows])
            if episodes:
                m.update({"turns": episodes["env/turns"], "return": episodes["env/return"],
                          "env_failures": episodes["env/failures"]})
                m.update({name: v for k, v in episodes.items()  # an info counter named like a metric is left out
                          if k.startswith("env/info/") and (name := k.removeprefix("env/info/")) not in m})
            if sampled is not None and s is self.sets[0]:
                n = self.samples
                correct = [sum(_correct(c.text, a) for c in sampled[i]) for i, a in zip(rows, answers)]
                m["pass@1"] = sum(pass_at_k(n, c, 1) for c in correct) / len(correct)
                if n > 1:
                    m[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in correct) / len(correct)
            out[s.name] = m
        out[""] = {"seconds": time.perf_counter() - t}
        return out

    @staticmethod
    def _by_row(completions: list[Completion], rows: int, n: int) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in range(rows)]
        for c in completions:
            out[c.prompt_index].append(c)
        if any(len(cs) != n for cs in out):
            raise RuntimeError(f"evaluation: the engines returned {len(completions)} completions for {rows} rows x {n}")
        return out


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """metrics.jsonl keys: ``eval_accuracy`` (the target's), ``eval/<set>/<metric>`` and ``eval_seconds``."""
    out = {"eval_accuracy": results[TARGET]["accuracy"]}
    for name, m in results.items():
        if name:
            out.update({f"eval/{name}/{k}": v for k, v in m.items()})
    out["eval_seconds"] = results[""]["seconds"]
    return out


def nest(flat: dict) -> dict[str, dict[str, float]]:
    """``eval/<set>/<metric>`` keys (:func:`flatten`) back to ``{set: {metric: value}}``; other keys are left out."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if key.startswith("eval/") and key.count("/") == 2:
            _, name, metric = key.split("/")
            out.setdefault(name, {})[metric] = value
    return out
