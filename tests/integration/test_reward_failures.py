"""Reward failures and reward-actor deaths on the real stack (hf backend: fast on CPU), on one shared trainer.

A user reward fails on a known third of the prompts (``user_rewards.flaky``); with ``reward.on_failure =
drop_group`` the groups of those prompts leave their step. Every count the test checks, in metrics.jsonl and on the
Prometheus endpoint scraped over HTTP, is computed here from the prompts the scheduler picked and the failure rule.
A reward actor killed while a step scores is restarted by Ray and its work retried. Tests run in file order on one
trainer (the first runs it; the counters accumulate over them).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import urllib.request
from pathlib import Path

import pytest

from actors.config import load_config
from actors.scheduler import Scheduler, StepPlan
from tests.integration.user_rewards import flaky, flaky_parts
from tests.procs import children, wait_dead

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
REWARD = "tests.integration.user_rewards:flaky_parts"
STEPS = 4


# Malformed rows written among the data files' good ones (data.on_bad_row = skip): (line after which, text)
BAD_LINES = {"prompts": [(3, '{"prompt": "ab=",'), (10, '{"prompt": "ab="}')], "expert": [(0, "[1]")], "eval": []}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from actors.driver import Trainer
    from rollout.data import make_synthetic

    tmp = tmp_path_factory.mktemp("reward-failures")
    data = make_synthetic("reverse", seed=0, alphabet="abcdef", min_len=3, max_len=5, num_prompts=2000,
                          num_expert=2000, num_eval=10)
    for kind, rows in data.items():
        lines = [json.dumps(r) for r in rows]
        for after, text in reversed(BAD_LINES[kind]):
            lines.insert(after, text)
        (tmp / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        "rollout.backend=hf", f"train.steps={STEPS}", "train.eval_every=0",
        "data.synthetic=null", *(f"data.{kind}={tmp / kind}.jsonl" for kind in data), "data.on_bad_row=skip",
        "train.max_staleness=1",  # async: step k+1's rollouts are scored and filtered while step k trains
        "algo.mu_peak=0.5",  # mu < 1 from step 0 on, so every step has prompt groups to score
        f"reward.functions=[{{name: '{REWARD}'}}]", "reward.on_failure=drop_group"])
    t = Trainer(cfg, tmp / "run")
    t.good_rows = data
    yield t
    t.close()


def test_bad_data_rows_are_skipped_named_and_counted(trainer):
    """data.on_bad_row = skip: the good rows are all there, in order; each bad one is named by file and line, and
    counted per data set on the endpoint."""
    assert trainer.prompts == trainer.good_rows["prompts"] and trainer.expert == trainer.good_rows["expert"]
    target = trainer.evaluator.sets[0]
    assert target.name == "target" and target.rows == trainer.good_rows["eval"]
    prompts = trainer.cfg.data.prompts
    assert trainer.skipped_rows["prompts"] == [f"{prompts}:4: not valid JSON (Expecting property name enclosed in "
                                               f"double quotes)", f"{prompts}:12: field 'answer' (a string) is missing"]
    assert trainer.skipped_rows["expert"] == [f"{trainer.cfg.data.expert}:1: a row must be a JSON object, got list"]
    metrics = _scrape((trainer.run_dir / "metrics_url").read_text().strip())
    for kind in ("prompts", "expert", "eval"):
        assert metrics[f'chorus_data_rows_skipped_total{{dataset="{kind}"}}'] == len(BAD_LINES[kind])


def _scrape(url: str) -> dict[str, float]:
    """The endpoint's samples over HTTP: {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}


def _failing(trainer, prompt_ids: list[int]) -> list[int]:
    return [i for i in prompt_ids if flaky(trainer.prompts[i]["prompt"])]


def test_drop_group_leaves_failed_groups_out_and_counts_them(trainer, caplog):
    cfg, n = trainer.cfg, trainer.cfg.rollout.n
    # a second scheduler with the same seed and sizes picks what the run's picks
    replay = Scheduler(cfg.algo, n, len(trainer.prompts), len(trainer.expert), cfg.train.seed)
    plans = [replay.plan(step) for step in range(STEPS)]
    failing = [_failing(trainer, p.prompt_ids) for p in plans]
    dropped = sum(map(len, failing))
    assert 0 < dropped < sum(len(p.prompt_ids) for p in plans)  # the rule drops some groups, and keeps some

    with caplog.at_level(logging.WARNING, logger="chorus"):
        trainer.run()

    steps = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").open() if '"final"' not in line]
    assert [r["dropped_groups"] for r in steps] == [len(f) for f in failing]
    assert [r["samples"] for r in steps] == [(len(p.prompt_ids) - len(f)) * n for p, f in zip(plans, failing)]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in steps)  # no NaN, no fallback among the kept rows
    for p, f in zip(plans, failing):  # the log names each dropped prompt
        if f:
            line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"step {p.step}: dropped"))
            assert all(repr(trainer.prompts[i]["prompt"]) in line for i in f), line

    metrics = _scrape((trainer.run_dir / "metrics_url").read_text().strip())
    assert metrics["chorus_reward_dropped_groups_total"] == dropped
    assert metrics[f'chorus_reward_failures_total{{reward="{REWARD}"}}'] == dropped * n  # every sample of them
    assert metrics["chorus_samples_generated_total"] == sum(r["samples"] for r in steps)
    # the part of the last step's kept rows: the mean length of its kept prompts (n samples each)
    kept = [trainer.prompts[i]["prompt"] for i in plans[-1].prompt_ids if i not in failing[-1]]
    chars = sum(map(len, kept)) / len(kept)
    assert steps[-1][f"reward/{REWARD}.prompt_chars"] == pytest.approx(chars, abs=1e-9)
    assert metrics[f'chorus_reward_mean{{component="{REWARD}.prompt_chars"}}'] == pytest.approx(chars, abs=1e-9)
    assert metrics[f'chorus_reward_mean{{component="{REWARD}"}}'] == pytest.approx(steps[-1]["reward_mean"])


def _engine_checksum(trainer) -> float:
    """The engines' weights once the queued loads are done (the trainer is async: step() queues its sync)."""
    trainer.supply.finish()
    return trainer.rollouts.all(lambda a: a.checksum.remote())[0]


def test_a_step_whose_groups_all_fail_trains_on_its_expert_rows_or_on_nothing(trainer):
    failing = _failing(trainer, range(len(trainer.prompts)))[: trainer.cfg.algo.prompts_per_step]
    expert = list(range(trainer.scheduler.num_expert))
    start = _engine_checksum(trainer)
    record = trainer.step(StepPlan(step=STEPS, prompt_ids=failing, expert_ids=expert, mu=0.5))
    assert record["samples"] == 0 and record["dropped_groups"] == len(failing)
    assert record["reward_mean"] is None
    assert record["optimizer_steps"] == 1 and record["sft_loss"] > 0  # the expert rows alone
    assert record["rl_loss"] == 0.0

    before = _engine_checksum(trainer)
    assert before != pytest.approx(start, abs=1e-3)  # the expert rows' step moved the weights
    record = trainer.step(StepPlan(step=STEPS + 1, prompt_ids=failing, expert_ids=[], mu=0.5))
    assert record["samples"] == 0 and record["dropped_groups"] == len(failing)
    assert record["optimizer_steps"] == 0 and record["loss"] is None  # no rows: no optimiser step
    assert _engine_checksum(trainer) == before  # so the weights did not move
    assert "reward -  loss - (rl - sft -)" in trainer._console_line(record)


def test_reward_actor_killed_mid_run_is_restarted_and_its_scoring_retried(trainer, monkeypatch):
    """Ray restarts a dead reward actor from its constructor arguments; the step's scoring, which died with it, is
    retried (and the restart counted), and the step's rewards are the reward function's, not fallbacks.

    To kill the actor while it is scoring, not before or after: its reward process is stopped (SIGSTOP), so the
    call waits on it, and the actor's process is SIGKILLed a second into the call, as a crash would. The stopped
    reward process dies with its parent (the kernel's parent-death signal)."""
    url = (trainer.run_dir / "metrics_url").read_text().strip()
    counted = _scrape(url)['chorus_actor_restarts_total{role="reward"}']
    restarts = trainer.rewards.restarts
    actor_pid = trainer.rewards.pids[0]
    reward_procs = children(actor_pid)
    assert reward_procs, "the reward actor has no reward process"
    score = trainer.maker.score

    def kill_while_scoring(rows, responses):
        for pid in reward_procs:
            os.kill(pid, signal.SIGSTOP)
        threading.Timer(1.0, os.kill, (actor_pid, signal.SIGKILL)).start()
        return score(rows, responses)

    monkeypatch.setattr(trainer.maker, "score", kill_while_scoring)
    plan = trainer.scheduler.plan(STEPS + 2)
    _engine_checksum(trainer)  # no weight load left in flight beside this step's generation
    rollouts = trainer.maker(plan)  # trainer.step() = _learn(maker(plan)): split to see the scores
    record = trainer._learn(rollouts)
    assert trainer.rewards.pids[0] != actor_pid
    assert wait_dead(reward_procs), "the old actor's reward process outlived it"

    failing = _failing(trainer, plan.prompt_ids)
    assert rollouts.dropped == failing
    assert record["samples"] == (len(plan.prompt_ids) - len(failing)) * trainer.cfg.rollout.n
    # the rewards of the kept rows, recomputed here from their responses
    data = [trainer.prompts[plan.prompt_ids[c.prompt_index]] for _, c in rollouts.rows]
    expected = [d["score"] for d in flaky_parts([r["prompt"] for r in data], [c.text for _, c in rollouts.rows],
                                                answer=[r["answer"] for r in data])]
    assert [s.total for s in rollouts.scored] == expected and not any(s.failed for s in rollouts.scored)
    assert trainer.rewards.restarts == restarts + 1  # one new process, however many calls failed meanwhile
    assert _scrape(url)['chorus_actor_restarts_total{role="reward"}'] == counted + 1
