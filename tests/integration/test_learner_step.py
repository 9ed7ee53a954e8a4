"""The learner's training step, wired as a run wires it: the real LearnerActor (DeepSpeed, one rank, in a process of
its own, without Ray) on the tiny model, with a batch built by hand. Each check fails if one piece of the wiring is
swapped: which log-probabilities are the old ones, mu against 1 - mu, the sign of the RL term, expert rows outside
the SFT term. learners/losses.py's maths is tested on its own in tests/unit/test_losses.py; this is the wiring.
"""

from __future__ import annotations

import math
import multiprocessing
import socket

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MU = 0.3
PROMPT = [1, 40, 41, 42]  # <s> and three characters
ROWS = {  # response tokens; the last is the end token
    "up": [50, 51, 2],  # on-policy, advantage +1
    "down": [52, 53, 54, 2],  # on-policy, advantage -1
    "expert": [55, 56, 2],  # an expert demonstration
}


def _batch(names, old=None, adv=None):
    from learners.batch import TrainBatch

    return TrainBatch(input_ids=[PROMPT + ROWS[n] for n in names], prompt_lens=[len(PROMPT)] * len(names),
                      old_logprobs=[(old or {}).get(n, [0.0] * len(ROWS[n])) for n in names],
                      advantages=[[(adv or {}).get(n, 0.0)] * len(ROWS[n]) for n in names],
                      is_expert=[n == "expert" for n in names])


def _learner(model_dir: str, port: int, *, autocast: str = "", reference: bool = False, compile: bool = False,
             grad_clip: float = 0.0):
    from actors.config import LearnerConfig
    from learners.learner import LearnerActor
    from learners.losses import LossSpec

    # beta1 = 0: each update is the gradient scaled per parameter by a positive factor, so a small step moves a
    # log-probability the way its gradient says, whatever the previous steps were
    cfg = LearnerConfig(lr=1e-4, betas=[0.0, 0.999], grad_clip=grad_clip, micro_batch_size=8, autocast=autocast,
                        compile=compile)
    actor = LearnerActor(model_dir, cfg, LossSpec(clip_low=0.2, clip_high=0.2), dtype="float32", seed=0, rank=0,
                         world_size=1, reference=reference)
    actor.setup("127.0.0.1", port)
    return actor


def _child(model_dir: str, port: int, out) -> None:
    actor = _learner(model_dir, port)
    names = ["up", "down", "expert"]
    lp = dict(zip(names, actor.logprobs(_batch(names))))
    # behaviour log-probabilities 0.05 below / above the learner's: ratios e^0.05 and e^-0.05, inside the clip range
    old = {"up": [x - 0.05 for x in lp["up"]], "down": [x + 0.05 for x in lp["down"]]}
    # the expert row carries an advantage the driver never gives it (its are 0): in the RL term it would show
    batch = _batch(names, old, {"up": 1.0, "down": -1.0, "expert": 5.0})
    metrics = actor.train_step([batch], mu=MU, **batch.counts())
    after = dict(zip(names, actor.logprobs(_batch(names))))
    # one term at a time: the sign of each term's update
    steps = {}
    for name, mu, adv in (("up", 0.0, 1.0), ("down", 0.0, -1.0), ("expert", 1.0, 0.0)):
        current = actor.logprobs(_batch([name]))[0]
        b = _batch([name], {name: current}, {name: adv})  # on-policy: old = current, ratio 1
        actor.train_step([b], mu=mu, **b.counts())
        steps[name] = sum(actor.logprobs(_batch([name]))[0]) - sum(current)
    optimizer = actor.engine.optimizer
    out.put({"lp": lp, "metrics": metrics, "after": after, "steps": steps, "zero_stage": actor.zero_stage,
             "engine_zero_stage": actor.engine.zero_optimization_stage(), "configured_stage": actor.cfg.zero_stage,
             "optimizer": type(optimizer).__name__, "fused": optimizer.defaults.get("fused")})


def _child_compiled(model_dir: str, port: int, out) -> None:
    """The step with ``learner.compile``, against the eager reference copy of the same initial weights."""
    actor = _learner(model_dir, port, reference=True, compile=True)
    names = ["up", "down", "expert"]
    eager = dict(zip(names, actor.reference_logprobs(_batch(names))))  # the frozen copy: not compiled
    old = {"up": [x - 0.05 for x in eager["up"]], "down": [x + 0.05 for x in eager["down"]]}
    batch = _batch(names, old, {"up": 1.0, "down": -1.0})
    metrics = actor.train_step([batch], mu=MU, **batch.counts())
    shorter = _batch(["down"], {"down": old["down"]}, {"down": -1.0})  # another shape: the same graph
    second = actor.train_step([shorter], mu=0.0, **shorter.counts())
    module = actor.engine.module
    out.put({"eager": eager, "metrics": metrics, "second": second,
             "compiled": getattr(module, "_compiled_call_impl", None) is not None,
             "keys": sorted(actor._full_state_dict()) == sorted(actor.ref_model.state_dict())})


def _child_autocast(model_dir: str, port: int, out) -> None:
    """The same step with ``learner.autocast: bfloat16``, next to a float32 learner's log-probabilities; with a
    gradient limit of 1e-3, which the step's gradient norm is far above, and the norm of the gradients the optimiser
    is handed."""
    import torch

    from learners.reference import response_logprobs

    actor = _learner(model_dir, port, autocast="bfloat16", reference=True, grad_clip=1e-3)
    seen = []
    actor.engine.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append(float(
        torch.nn.utils.get_total_norm([p.grad for g in optimizer.param_groups for p in g["params"]]))))
    names = ["up", "down", "expert"]
    lp = dict(zip(names, actor.logprobs(_batch(names))))
    fp32 = dict(zip(names, response_logprobs(actor.ref_model, _batch(names), actor.pad_id, "cpu")))  # no autocast
    ref = dict(zip(names, actor.reference_logprobs(_batch(names))))
    old = {"up": [x - 0.05 for x in lp["up"]], "down": [x + 0.05 for x in lp["down"]]}
    batch = _batch(names, old, {"up": 1.0, "down": -1.0})
    metrics = actor.train_step([batch], mu=MU, **batch.counts())
    optimizer = actor.engine.optimizer
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    out.put({"lp": lp, "fp32": fp32, "ref": ref, "metrics": metrics, "clipped_norms": seen,
             "param_dtypes": sorted({str(p.dtype) for p in actor.engine.module.parameters()}),
             "state_dtypes": sorted({str(v.dtype) for v in states}),
             "master_dtypes": sorted({str(p.dtype) for g in optimizer.param_groups for p in g["params"]})})


def _run(child, tmp_path_factory):
    from pathlib import Path

    from rollout.tiny import build_model

    model = build_model(Path(__file__).resolve().parents[2] / "configs/models/tiny_llama.json",
                        tmp_path_factory.mktemp("learner") / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")  # a process group of its own, away from the test process
    out = ctx.Queue()
    proc = ctx.Process(target=child, args=(str(model), port, out))
    proc.start()
    try:
        return out.get(timeout=240)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return _run(_child, tmp_path_factory)


@pytest.fixture(scope="module")
def autocast(tmp_path_factory):
    return _run(_child_autocast, tmp_path_factory)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _run(_child_compiled, tmp_path_factory)


def test_loss_is_one_minus_mu_rl_plus_mu_sft_with_the_behaviour_logprobs_as_old(result):
    lp, m = result["lp"], result["metrics"]
    # RL term, token mean over the 3 + 4 on-policy tokens: -(1/7) * sum_t A * exp(lp_t - old_t), no clipping
    # (ratios e^0.05 = 1.0513 and e^-0.05 = 0.9512 lie inside [0.8, 1.2]):
    #   = -(1/7) * (3 * e^0.05 - 4 * e^-0.05) = -(3.1538 - 3.8049) / 7 = 0.0930
    # Had the learner used its own log-probabilities as the old ones, every ratio would be 1: -(3 - 4) / 7 = 0.1429.
    rl = -(3 * math.exp(0.05) - 4 * math.exp(-0.05)) / 7
    assert m["rl_loss"] == pytest.approx(rl, abs=1e-5)
    # SFT term: the expert row's mean negative log-likelihood; on-policy rows are not in it
    sft = -sum(lp["expert"]) / 3
    assert m["sft_loss"] == pytest.approx(sft, abs=1e-5)
    # (1 - mu) * RL + mu * SFT; swapped it would be 0.3 * 0.0930 + 0.7 * sft
    assert m["loss"] == pytest.approx((1 - MU) * rl + MU * sft, abs=1e-5)
    assert abs((MU * rl + (1 - MU) * sft) - m["loss"]) > 1e-2


def test_expert_rows_are_only_in_the_sft_term(result):
    lp, m = result["lp"], result["metrics"]
    # the expert row's advantage 5 and old log-probabilities 0: in the RL term it would add -5 * sum_t exp(lp_t) / 7
    in_rl = -(3 * math.exp(0.05) - 4 * math.exp(-0.05) + 5 * sum(math.exp(x) for x in lp["expert"])) / 7
    assert abs(m["rl_loss"] - in_rl) > 1e-3
    # on-policy rows in the SFT term would average their log-likelihoods in too, over 10 tokens
    mixed = -(sum(lp["up"]) + sum(lp["down"]) + sum(lp["expert"])) / 10
    assert abs(m["sft_loss"] - mixed) > 1e-3


def test_each_term_moves_the_policy_the_right_way(result):
    s = result["steps"]
    assert s["up"] > 0, s  # positive advantage: its response becomes more likely
    assert s["down"] < 0, s  # negative advantage: less likely
    assert s["expert"] > 0, s  # SFT: the demonstration becomes more likely
    after, before = result["after"], result["lp"]
    assert sum(after["up"]) > sum(before["up"]) and sum(after["down"]) < sum(before["down"])
    assert sum(after["expert"]) > sum(before["expert"])


def test_autocast_computes_in_bfloat16_and_keeps_float32_weights_and_optimiser_state(autocast):
    r = autocast
    # every weight, its AdamW moments and the parameters the optimiser updates stay float32 (mixed precision)
    assert r["param_dtypes"] == ["torch.float32"] and r["master_dtypes"] == ["torch.float32"]
    assert r["state_dtypes"] == ["torch.float32"], r["state_dtypes"]
    # the products ran in bfloat16: the log-probabilities differ from float32's, by bfloat16's rounding (8 bits of
    # mantissa: a relative 4e-3 per product), not by a different model
    diffs = [abs(a - b) for n in r["lp"] for a, b in zip(r["lp"][n], r["fp32"][n])]
    assert 1e-5 < max(diffs) < 0.05, diffs
    # the colocated reference computes as the learner does: the same weights give the same numbers
    assert r["ref"] == r["lp"]
    # the step's forward pass runs the same bfloat16 kernels as logprobs(): the ratios are exactly e^0.05 and e^-0.05,
    # so the loss is the hand-computed one of test_loss_is_one_minus_mu_rl_plus_mu_sft_... to float32 rounding
    rl = -(3 * math.exp(0.05) - 4 * math.exp(-0.05)) / 7
    assert r["metrics"]["rl_loss"] == pytest.approx(rl, abs=1e-5)
    assert r["metrics"]["sft_loss"] == pytest.approx(-sum(r["lp"]["expert"]) / 3, abs=1e-5)


def test_gradients_are_clipped_to_the_limit_and_the_norm_reported_is_before_clipping(autocast):
    """One rank trains at ZeRO stage 0, where the learner clips (DeepSpeed would take the norm a second time)."""
    norm, (seen,) = autocast["metrics"]["grad_norm"], autocast["clipped_norms"]
    assert norm > 0.1  # far above the limit: clipping must act
    assert seen == pytest.approx(1e-3 * norm / (norm + 1e-6), rel=1e-4)  # scaled by 1e-3 / (norm + 1e-6)


def test_one_rank_trains_unpartitioned_with_fused_adamw(result):
    # learner.zero_stage (2 by default) partitions across ranks; one rank has nothing to partition and runs stage 0
    assert result["configured_stage"] == 2 and result["zero_stage"] == 0 and result["engine_zero_stage"] == 0
    assert result["optimizer"] == "AdamW" and result["fused"] is True  # torch's fused kernel, not the loop of ops
    # unwrapped, DeepSpeed reports no gradient norm (it read 0): the learner takes it itself
    assert result["metrics"]["grad_norm"] > 0


def test_compiled_learner_computes_what_the_eager_one_does(compiled):
    r = compiled
    assert r["compiled"] and r["keys"]  # compiled in place: the weights handed out keep their names
    # old = the eager model's log-probabilities -/+ 0.05: the compiled forward must give the eager numbers for the
    # ratios to be e^0.05 and e^-0.05 and the loss the hand-computed one of test_loss_is_one_minus_mu_rl_plus_mu_sft
    rl = -(3 * math.exp(0.05) - 4 * math.exp(-0.05)) / 7
    assert r["metrics"]["rl_loss"] == pytest.approx(rl, abs=1e-5)
    assert r["metrics"]["sft_loss"] == pytest.approx(-sum(r["eager"]["expert"]) / 3, abs=1e-5)
    # a batch of another shape after one step: the "down" row alone, advantage -1, so its loss is the mean of its 4
    # ratios, e^-0.05 = 0.9512 times what the first step moved them by. That step made "down" less likely (advantage
    # -1), so the loss lies below 0.9512, and above the clip bound 0.8
    assert 0.8 < r["second"]["rl_loss"] < math.exp(-0.05)
