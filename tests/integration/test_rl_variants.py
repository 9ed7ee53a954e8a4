"""The RL core's options, each run end to end once on the real stack (Ray, both rollout backends, DeepSpeed) from the
shipped base model: sampling at temperature 0.7 with top-p, the learner's recomputed log-probabilities and the
engine/learner mismatch they measure, each importance-sampling correction level, GSPO, clip-higher, RLOO, the KL
penalty in the reward and as a k2 loss term, Dr. GRPO's aggregation, DAPO's dynamic sampling and overlong filter and
penalty, the linear mu schedule and phi.

Two short runs: a bfloat16 engine against a float32 learner, where the mismatch is real, and a float32 vLLM engine,
where engine and learner must agree to rounding at temperature 0.7 and top-p 0.9. The maths of each option is tested
by hand in tests/unit/test_loss_variants.py; this checks the wiring: that a run with the option goes, records what it
should, and that the records mean what they say.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from actors.config import load_config
from tests.runs import train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.eval_every=0", "train.eval_max_rows=8", "train.eval_samples=0",
          "train.eval_at_start=false", "algo.prompts_per_step=4", "rollout.n=4", "rollout.temperature=0.7",
          "rollout.top_p=0.9", "algo.recompute_logprobs=true", "checkpoint.every=0",
          "learner.autocast=''"]  # a float32 learner, against which each engine's precision is the variable


def _run(tmp_path: Path, overrides: list[str]) -> list[dict]:
    return train(load_config(ROOT / "configs" / "grpo.yaml", [*COMMON, *overrides]), tmp_path / "run")


def _finite(records: list[dict], *keys: str) -> None:
    for r in records:
        for k in keys:
            assert r[k] is not None and math.isfinite(r[k]), (r["step"], k, r[k])


def test_bfloat16_engine_against_float32_learner_with_every_new_option(tmp_path):
    records = _run(tmp_path, [
        "rollout.backend=hf", "rollout.dtype=bfloat16", "model.dtype=float32",
        "algo.is_correction=token-truncate", "algo.is_cap=1.5",
        "algo.policy_loss=gspo", "algo.loss_agg=seq-mean-token-mean", "algo.clip_eps=0.2", "algo.clip_eps_high=0.28",
        "algo.advantage=rloo", "algo.kl_coef=0.05", "algo.kl_penalty=reward", "algo.kl_estimator=k1",
        "algo.expert_ratio=0.2", "algo.mu_peak=0.5", "algo.mu_valley=0.1", "algo.mu_decay_steps=4",
        "algo.mu_schedule=linear", "algo.sft_weight=phi",
        "algo.dynamic_sampling=true", "algo.max_sample_rounds=3", "algo.overlong_filter=true",
        "rollout.max_new_tokens=6", "algo.overlong_buffer=3",
    ])
    assert len(records) == STEPS
    _finite(records, "loss", "rl_loss", "sft_loss", "ref_kl", "mismatch_kl", "is_ratio", "is_weight",
            "is_ratio_outside", "is_seq_outside", "clip_frac", "entropy")
    # the linear schedule: 0.5 - 0.4 * s / 4, then the valley
    assert [r["mu"] for r in records] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1], abs=1e-12)
    # a bfloat16 engine samples from another distribution than the float32 learner with the same weights: the
    # mismatch is there at every step (about 1e-3 nats here; float32 against float32 is about 1e-11, see below),
    # and TIS at C = 1.5 truncates some tokens' ratios, so the mean weight is below the mean ratio
    assert all(r["mismatch_kl"] > 1e-5 for r in records), [r["mismatch_kl"] for r in records]
    assert all(0.9 < r["is_ratio"] < 1.1 for r in records)
    assert sum(r["is_ratio_outside"] for r in records) > 0
    assert all(r["is_weight"] <= r["is_ratio"] + 1e-9 for r in records)
    # the reward-side KL penalty leaves no KL term in the loss but is still measured (k1 of the rollouts)
    assert all(r["ref_kl"] is not None for r in records)
    # dynamic sampling: groups with equal rewards leave (the base gets about 3 in 10 of these right at temperature
    # 0.7, so some groups of 4 are all wrong), more prompts are sampled, and a step has its 4 groups unless it ran
    # out of rounds
    assert sum(r["filtered_groups"] for r in records) > 0 and max(r["sample_rounds"] for r in records) > 1
    assert all(r["samples"] == 16 or r["sample_rounds"] == 3 for r in records)
    assert all(1 <= r["sample_rounds"] <= 3 and r["samples"] % 4 == 0 for r in records)
    # a budget of 6 tokens cuts off the answers of 6 and 7 letters (+ the end token), which the overlong filter
    # then leaves out of the loss; the soft penalty starts past 6 - 3 = 3 tokens
    assert sum(r["truncated_rows"] for r in records) > 0
    overlong = [r["reward/overlong"] for r in records]
    assert all(-1.0 <= x <= 0.0 for x in overlong) and min(overlong) < 0, overlong


def test_float32_vllm_engine_agrees_with_the_learner_at_temperature_and_top_p(tmp_path):
    records = _run(tmp_path, [
        "rollout.backend=vllm", "model.dtype=float32", "rollout.dtype=float32", "algo.is_correction=seq-mask",
        "algo.dual_clip=3.0",
        "algo.kl_coef=0.05", "algo.kl_estimator=k2", "algo.loss_agg=seq-mean-token-sum-norm",
    ])
    assert len(records) == STEPS
    _finite(records, "loss", "ref_kl", "mismatch_kl", "is_ratio", "dual_clip_frac")
    # same weights, same precision, the same tempered nucleus on both sides: the engine's log-probabilities are the
    # learner's to rounding (a mismatch_kl of 1e-3 would mean a different distribution: temperature 1 gives ~0.1)
    assert all(r["mismatch_kl"] < 1e-6 for r in records), [r["mismatch_kl"] for r in records]
    assert all(abs(r["is_ratio"] - 1.0) < 1e-3 for r in records)
    # so no sequence is masked and every weight (the sequence's ratio, the product of its tokens') is 1 to rounding
    assert all(r["is_seq_outside"] == 0.0 and abs(r["is_weight"] - 1.0) < 1e-3 for r in records), records


@pytest.mark.parametrize("correction", ["token-mask", "seq-truncate"])
def test_the_other_corrections_run_and_act(tmp_path, correction):
    # a cap of 1.02 is tight enough that a bfloat16 engine's ratios cross it, so the correction acts
    records = _run(tmp_path, ["train.steps=3", "rollout.backend=hf", "rollout.dtype=bfloat16",
                              f"algo.is_correction={correction}", "algo.is_cap=1.02"])
    _finite(records, "loss", "mismatch_kl", "is_ratio", "is_weight")
    if correction == "token-mask":  # a masked token weighs 0 instead of its ratio: the mean weight falls below
        assert sum(r["is_ratio_outside"] for r in records) > 0
        assert all(r["is_weight"] < r["is_ratio"] for r in records if r["is_ratio_outside"] > 0)
    else:  # every token weighs its sequence's ratio, truncated at C
        assert sum(r["is_seq_outside"] for r in records) > 0
        assert all(r["is_weight"] <= 1.02 + 1e-6 for r in records), [r["is_weight"] for r in records]
