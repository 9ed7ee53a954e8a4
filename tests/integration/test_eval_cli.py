"""`chorus eval MODEL_DIR CONFIG`, as a user runs it: the shipped base model on its own pretraining config's held-out
sets reproduces the accuracies its card (models/base/eval.json) reports; on the quickstart's sets it gives pass@k on
the target from samples; a bad model directory is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHORUS = str(Path(sys.executable).parent / "chorus")


def _eval(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([CHORUS, "eval", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_base_model_scores_what_its_card_says():
    card = json.loads((ROOT / "models/base/eval.json").read_text())
    proc = _eval("models/base", "configs/pretrain_base.yaml", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    target, *retention = card["accuracy"]  # families in the pretraining config's data.tasks.eval order
    got = {name: m["accuracy"] for name, m in out["sets"].items()}
    assert list(got) == ["target", *retention]
    # the same greedy generations as the pretraining run's final evaluation: exactly its accuracies
    assert got["target"] == card["accuracy"][target]
    for family in retention:
        assert got[family] == card["accuracy"][family], family
    assert out["rows"] == 200 * len(card["accuracy"])


def test_pass_at_k_on_the_target_and_a_table():
    # the quickstart's sets: the post-training target (sortrep), which the base does partly, then retention sets
    proc = _eval("models/base", "configs/quickstart.yaml", "train.eval_samples=4", "train.eval_max_rows=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("set"))
    assert lines[head].split() == ["set", "accuracy", "pass@1", "pass@4", "tokens"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[head + 1:] if not line.startswith("(")}
    assert list(rows) == ["target", "add2", "rev", "sort", "count", "upper"]
    acc, p1, p4, _ = map(float, rows["target"])
    assert 0.05 < acc < 0.6 and 0.0 < p1 < p4 < 1.0  # partly done: sampling 4 times finds more right answers
    assert rows["rev"][1] == "-"  # retention sets: greedy only
    assert lines[-1] == "(240 rows in " + lines[-1].split(" rows in ")[1]  # 6 sets x 40 rows


def test_a_directory_without_a_model_is_a_config_error(tmp_path):
    proc = _eval(str(tmp_path), "configs/pretrain_base.yaml", timeout=120)
    assert proc.returncode == 2
    assert f"MODEL_DIR '{tmp_path}' holds no config.json" in proc.stderr
