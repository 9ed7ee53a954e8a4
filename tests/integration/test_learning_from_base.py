"""RL makes the pretrained base better at what it does partly: pure GRPO (configs/grpo.yaml, exact match as the
only reward, no expert row) raises the held-out accuracy of the target, sorting letters that repeat, within a small
budget, and the reward it is trained on rises with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def test_grpo_from_the_base_raises_target_accuracy(tmp_path, monkeypatch):
    from actors.driver import Trainer

    monkeypatch.chdir(ROOT)  # model.path models/base is relative to the repository
    cfg = load_config(ROOT / "configs/grpo.yaml", [f"train.steps={STEPS}", "train.eval_every=0",
                                                   "train.eval_samples=0", f"learner.decay_steps={STEPS}"])
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    start, end = summary["initial_eval_accuracy"], summary["final_eval_accuracy"]
    assert end >= start + MARGIN, (start, end)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == STEPS and all(r["expert_rows"] == 0 and r["mu"] == 0.0 for r in steps)  # RL alone
    early = sum(r["reward_mean"] for r in steps[:5]) / 5
    late = sum(r["reward_mean"] for r in steps[-5:]) / 5
    assert late > early, (early, late)


STEPS = 40
MARGIN = 0.10  # measured with these settings: 0.280 -> 0.470 (seed 0); greedy evaluation on fixed rows, so an
#                unchanged model scores exactly the same
