"""Data parallelism does not change the maths: 2 and 3 DeepSpeed ranks (gloo) give the same losses and gradient
norms as 1 rank, step after step, because each loss term is normalised by the token count of the global batch.
With 3 ranks the 128 rows split unevenly (43/43/42)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, ranks: int) -> list[dict]:
    from actors.driver import Trainer

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"learner.num_actors={ranks}", "learner.num_cpus=0.25",
        "learner.micro_batch_size=16",  # several micro-batches per rank too
        "algo.mu_peak=0.5", "algo.mu_valley=0.5", "algo.mu_decay_steps=0",  # both loss terms weigh in
        "train.steps=3", "data.synthetic.num_eval=20",
    ])
    # a user reward by module:attr, with partial credit so that the RL term has non-zero advantages at step 0
    cfg.reward.functions[0].name = "tests.integration.user_rewards:position_match"
    trainer = Trainer(cfg, tmp_path / f"dp{ranks}")
    try:
        return [trainer.step(trainer.scheduler.plan(step)) for step in range(3)]
    finally:
        trainer.close()


def test_two_and_three_ranks_match_one_rank(tmp_path):
    one = _run(tmp_path, 1)
    for ranks in (2, 3):
        for a, b in zip(one, _run(tmp_path, ranks)):
            assert a["rl_loss"] != 0.0 and a["sft_loss"] != 0.0  # both terms present
            for key in ("loss", "rl_loss", "sft_loss", "grad_norm", "reward_mean"):
                assert b[key] == pytest.approx(a[key], abs=1e-5), (ranks, key, a[key], b[key])
