"""Every ready config in configs/ loads and validates, says how to launch it, and sets what its name promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.config import load_config
from actors.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.chdir(ROOT)  # model.build paths are relative to the repository root


def test_the_presets_are_all_there():
    names = {str(p.relative_to(ROOT / "configs").with_suffix("")) for p in CONFIGS}
    presets = {"sft", "grpo", "ppo", "sft_then_rl", "chord_mu", "chord_phi", "chord"}
    assert {"quickstart", "quickstart_json", "smoke", "pretrain_base", *presets} <= names
    assert {f"from_scratch/{p}" for p in presets} <= names  # the random-init comparison's


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_loads_and_says_how_to_launch_it(path):
    cfg = load_config(path)
    header = path.read_text().splitlines()[:4]
    assert all(line.startswith("#") for line in header[:2]), f"{path.name}: starts with a comment header"
    assert any("Launch:" in line and ("chorus train" in line or "make" in line) for line in header), path.name
    assert cfg.train.steps >= 1


def _mu(path: Path, steps: list[int]) -> list[float]:
    cfg = load_config(path)
    sched = Scheduler(cfg.algo, cfg.rollout.n, 10, 10, 0)
    return [sched.mu(s) for s in steps]


def test_preset_semantics_from_the_base():
    c = {p.stem: load_config(p) for p in CONFIGS if p.parent.name == "configs"}
    for name in ("sft", "grpo", "ppo", "sft_then_rl", "chord_mu", "chord_phi", "chord", "quickstart"):
        cfg = c[name]
        assert cfg.model.path == "models/base" and cfg.data.tasks.mixture == {"sortrep": 1.0}, name
        assert cfg.data.tasks.eval[0] == "sortrep" and len(cfg.data.tasks.eval) == 6, name  # + five retention sets
        assert cfg.train.eval_at_start and cfg.train.eval_samples == 8, name
        assert cfg.learner.lr == 1e-4 and cfg.algo.prompts_per_step * cfg.rollout.n == 128, name  # one setting
    assert _mu(ROOT / "configs/sft.yaml", [0, 50, 99]) == [1.0, 1.0, 1.0]
    for name in ("grpo", "ppo"):
        assert _mu(ROOT / f"configs/{name}.yaml", [0, 99]) == [0.0, 0.0] and c[name].algo.expert_ratio == 0
    assert c["grpo"].algo.advantage == "grpo" and c["ppo"].algo.advantage == "gae"
    assert _mu(ROOT / "configs/sft_then_rl.yaml", [0, 29, 30, 99]) == [1.0, 1.0, 0.0, 0.0]
    mu = _mu(ROOT / "configs/chord_mu.yaml", [0, 30, 60, 99])
    assert mu[0] == 0.5 and 0.02 < mu[1] < 0.5 and mu[2] == mu[3] == 0.02 and c["chord_mu"].algo.sft_weight == "nll"
    assert len(set(_mu(ROOT / "configs/chord_phi.yaml", [0, 50, 99]))) == 1 and c["chord_phi"].algo.sft_weight == "phi"
    assert _mu(ROOT / "configs/chord.yaml", [0, 99]) == [0.5, 0.02] and c["chord"].algo.sft_weight == "phi"
    # the base model's pretraining: pure SFT on six families, evaluated on each and on the post-training target,
    # which is not in its corpus; the shipped card has the same families, in the same order
    pre = c["pretrain_base"]
    assert _mu(ROOT / "configs/pretrain_base.yaml", [0, pre.train.steps - 1]) == [1.0, 1.0]
    assert set(pre.data.tasks.eval) == {*pre.data.tasks.mixture, "sortrep"} and "sortrep" not in pre.data.tasks.mixture
    card = json.loads((ROOT / "models/base/eval.json").read_text())
    assert card["mixture"] == pre.data.tasks.mixture and card["steps"] == pre.train.steps
    assert list(card["accuracy"]) == list(pre.data.tasks.eval)


def test_preset_semantics_from_scratch():
    c = {p.stem: load_config(p) for p in CONFIGS if p.parent.name == "from_scratch"}
    d = ROOT / "configs/from_scratch"
    assert _mu(d / "sft.yaml", [0, 250, 499]) == [1.0, 1.0, 1.0]
    for name in ("grpo", "ppo"):
        assert _mu(d / f"{name}.yaml", [0, 499]) == [0.0, 0.0] and c[name].algo.expert_ratio == 0
    assert c["grpo"].algo.advantage == "grpo" and c["ppo"].algo.advantage == "gae"
    assert _mu(d / "sft_then_rl.yaml", [0, 149, 150, 499]) == [1.0, 1.0, 0.0, 0.0]
    mu = _mu(d / "chord_mu.yaml", [0, 150, 300, 499])
    assert mu[0] == 1.0 and 0.2 < mu[1] < 1.0 and mu[2] == mu[3] == 0.2 and c["chord_mu"].algo.sft_weight == "nll"
    assert len(set(_mu(d / "chord_phi.yaml", [0, 250, 499]))) == 1 and c["chord_phi"].algo.sft_weight == "phi"
    assert _mu(d / "chord.yaml", [0, 499]) == [1.0, 0.2] and c["chord"].algo.sft_weight == "phi"
    assert c["reverse"].model.build and c["reverse"].data.synthetic.task == "reverse"
    c = {p.stem: load_config(p) for p in CONFIGS if p.parent.name == "configs"}
    # the structured-output quickstart: the json task, scored by json_schema, room for the longest answer
    q = c["quickstart_json"]
    assert q.data.synthetic.task == "json" and "json_schema" in [f.name for f in q.reward.functions]
    assert q.rollout.max_new_tokens >= len('{"r":"","n":0}') + q.data.synthetic.max_len + 1  # + end of sequence
