"""The README's promise: `chorus train configs/quickstart.yaml` (what `make quickstart` runs) post-trains the shipped
base model with CHORD and ends with a target accuracy above the base's, reporting retention; a line per step, the
base's evaluation first and the final result last."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
RETENTION = ("add2", "rev", "sort", "count", "upper")


def test_quickstart_beats_the_base_and_reports_retention(tmp_path):
    run_dir = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "train", "configs/quickstart.yaml", "--run-dir",
                           str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    base = json.loads((ROOT / "models/base/eval.json").read_text())["accuracy"]
    # the run's own evaluation of the base agrees with the base's card (the same held-out rows, greedy)
    assert summary["initial_eval_accuracy"] == base["sortrep"]
    assert summary["final_eval_accuracy"] >= summary["initial_eval_accuracy"] + MARGIN, summary
    final = summary["final_eval"]
    assert set(final) == {"target", *RETENTION}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert records[0]["initial"] and final["target"]["pass@8"] > records[0]["eval/target/pass@8"]
    for family in RETENTION:  # reported, and what the base knew mostly kept (measured: sort 0.92 -> 0.74, 0.81x)
        assert final[family]["accuracy"] >= 0.7 * base[family], (family, final[family], base[family])
    lines = proc.stdout.splitlines()
    # Ray may print actor output first (log_to_driver): the run's lines in their order
    ours = [ln for ln in lines if ln.startswith(("chorus: run dir", "before training: eval_acc", "after training: "))]
    assert [ln.split(":")[0] for ln in ours] == ["chorus", "before training", "after training"], ours
    step_lines = [ln for ln in lines if re.match(r"step +\d+ +reward", ln)]
    assert len(step_lines) == 100
    assert re.search(r"eval_acc \d\.\d{3} \(pass@8 \d\.\d{3}\)  retention add2 \d\.\d\d rev", proc.stdout)
    after = next(ln for ln in lines if ln.startswith("after training: "))  # the final evaluation, retention too
    assert after.startswith(f"after training: eval_acc {summary['final_eval_accuracy']:.3f} (pass@8 ")
    assert f"count {final['count']['accuracy']:.2f} upper" in after
    assert f"final eval accuracy {summary['final_eval_accuracy']:.3f}" in proc.stdout


MARGIN = 0.25  # measured 0.280 -> 0.810 (seed 0); see the README's benchmark table
