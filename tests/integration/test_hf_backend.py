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
