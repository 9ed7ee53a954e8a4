"""The transformers-generate backend behind the same interface: its behaviour logprobs equal the learner's at
step 0 and after weight syncs, like the vLLM engine's (tests/integration/test_stack.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import load_config
from tests.integration.test_stack import _engine_vs_learner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from actors.driver import Trainer

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["rollout.backend=hf", "train.steps=3"])
    t = Trainer(cfg, tmp_path_factory.mktemp("hf"))
    yield t
    t.close()


def test_hf_backend_logprobs_match_learner_before_and_after_sync(trainer):
    worst, n = _engine_vs_learner(trainer, trainer.prompt_ids[:6])
    assert n >= 24 and worst < 1e-3, worst
    before = trainer.rollouts.all(lambda a: a.checksum.remote())[0]
    for step in range(3):
        trainer.step(trainer.scheduler.plan(step))
    assert trainer.rollouts.all(lambda a: a.checksum.remote())[0] != pytest.approx(before, abs=1e-3)
    worst, _ = _engine_vs_learner(trainer, trainer.prompt_ids[10:16])
    assert worst < 1e-3, worst


def test_rollout_actor_killed_mid_run_is_retried_and_comes_back_with_current_weights(trainer):
    """Ray restarts a dead rollout actor from its constructor arguments: the step's generation is retried (and
    counted), and the new process loads the last synced weights, not the initial model (else it would silently
    generate off-policy)."""
    import ray

    initial = trainer.rollouts.all(lambda a: a.checksum.remote())[0]
    trainer.step(trainer.scheduler.plan(3))  # one more sync after the previous test's steps
    current = trainer.rollouts.all(lambda a: a.checksum.remote())[0]
    restarts = trainer.rollouts.restarts
    ray.kill(trainer.rollouts.actors[0], no_restart=False)  # the process dies; Ray starts a new one
    record = trainer.step(trainer.scheduler.plan(4))  # generation hits the dead actor, is retried, goes on
    assert record["samples"] == trainer.cfg.algo.prompts_per_step * trainer.cfg.rollout.n
    assert trainer.rollouts.restarts == restarts + 1  # one new process, however many calls failed meanwhile
    assert trainer.metrics.restarts.labels("rollout")._value.get() == restarts + 1
    # the restarted engine started from the weights synced before the kill, then got step 4's sync
    after = trainer.rollouts.all(lambda a: a.checksum.remote())[0]
    assert after != pytest.approx(initial, abs=1e-3) and after != pytest.approx(current, abs=1e-6)
    worst, _ = _engine_vs_learner(trainer, trainer.prompt_ids[20:26])
    assert worst < 1e-3, worst
