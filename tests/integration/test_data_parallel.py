"""Data parallelism does not change the maths: 2 and 3 DeepSpeed ranks (gloo) give the same losses and gradient
norms as 1 rank, step after step, because each loss term is normalised by the token count of the global batch.
With 3 ranks the 128 rows split unevenly (43/43/42). The same holds for PPO (critic ranks too), a KL penalty, the
sequence-mean loss aggregation and several mini-batches; and a reference model in its own actor gives what the one
colocated in the learner gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, overrides: list[str], before=None) -> list[dict]:
    from actors.driver import Trainer

    cfg = load_config(ROOT / "configs" / "from_scratch" / "reverse.yaml", [
        "learner.num_cpus=0.25", "critic.num_cpus=0.25", "reference.num_cpus=0.25",
        "learner.micro_batch_size=16", "critic.micro_batch_size=16",  # several micro-batches per rank too
        "algo.mu_peak=0.5", "algo.mu_valley=0.5", "algo.mu_decay_steps=0",  # both loss terms weigh in
        "train.steps=3", "data.synthetic.num_eval=20", *overrides,
    ])
    # a user reward by module:attr, with partial credit so that the RL term has non-zero advantages at step 0
    cfg.reward.functions[0].name = "tests.integration.user_rewards:position_match"
    trainer = Trainer(cfg, tmp_path / name)
    try:
        if before:
            before(trainer)
        return [trainer.step(trainer.scheduler.plan(step)) for step in range(3)]
    finally:
        trainer.close()


def _assert_same(one: list[dict], other: list[dict], keys: tuple[str, ...], label: str) -> None:
    for a, b in zip(one, other, strict=True):
        assert a["rl_loss"] != 0.0 and a["sft_loss"] != 0.0  # both terms present
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (label, key, a[key], b[key])


def test_two_and_three_ranks_match_one_rank(tmp_path):
    one = _run(tmp_path, "dp1", ["learner.num_actors=1"])
    for ranks in (2, 3):
        _assert_same(one, _run(tmp_path, f"dp{ranks}", [f"learner.num_actors={ranks}"]),
                     ("loss", "rl_loss", "sft_loss", "grad_norm", "reward_mean"), f"{ranks} ranks")


PPO_KL = ["algo.advantage=gae", "algo.kl_coef=0.1", "algo.kl_estimator=k3", "algo.loss_agg=seq-mean-token-mean",
          "algo.mini_batches=2", "algo.epochs=2"]


def _reference_is_the_initial_policy(trainer) -> None:
    """Before any step, the reference's log-probabilities (colocated or separate) equal the policy's."""
    from learners.batch import TrainBatch

    ids = trainer.prompt_ids[:4]
    batch = TrainBatch(input_ids=[p + [5, 6, 7] for p in ids], prompt_lens=[len(p) for p in ids],
                       old_logprobs=[[0.0] * 3] * 4, advantages=[[0.0] * 3] * 4, is_expert=[False] * 4)
    policy = trainer.learners.all(lambda a: a.logprobs.remote(batch))[0]
    group = trainer.references or trainer.learners
    reference = group.all(lambda a: a.reference_logprobs.remote(batch))[0]
    assert len(policy) == 4 and all(len(row) == 3 for row in policy)
    worst = max(abs(a - b) for ref_row, row in zip(reference, policy, strict=True) for a, b in zip(ref_row, row, strict=True))
    assert worst < 1e-6


def test_ppo_with_kl_two_ranks_and_separate_reference_match_one_rank_colocated(tmp_path):
    one = _run(tmp_path, "ppo1", PPO_KL + ["learner.num_actors=1", "critic.num_actors=1", "reference.colocate=true"],
               before=_reference_is_the_initial_policy)
    two = _run(tmp_path, "ppo2", PPO_KL + ["learner.num_actors=2", "critic.num_actors=2", "reference.colocate=false"],
               before=_reference_is_the_initial_policy)
    assert all(r["optimizer_steps"] == 4 for r in one)  # 2 epochs x 2 mini-batches
    assert 0.0 < one[0]["ref_kl"] < one[-1]["ref_kl"]  # the policy moves away from the reference; the penalty sees it
    assert one[-1]["value_loss"] > 0.0
    _assert_same(one, two, ("loss", "rl_loss", "sft_loss", "grad_norm", "reward_mean", "ref_kl", "value_loss",
                            "value_clip_frac", "kl", "clip_frac"), "ppo+kl 2 ranks")
