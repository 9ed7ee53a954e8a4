"""The README's promise: `chorus train configs/quickstart.yaml` (what `make quickstart` runs) ends with a
held-out accuracy of at least 0.9, printing a line per step and the final result."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_reaches_090_held_out_accuracy(tmp_path):
    run_dir = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "train", "configs/quickstart.yaml", "--run-dir",
                           str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_accuracy"] >= 0.9, summary
    step_lines = [ln for ln in proc.stdout.splitlines() if re.match(r"step +\d+ +reward", ln)]
    assert len(step_lines) == 500
    assert re.search(r"eval_acc \d\.\d{3}", proc.stdout)
    assert f"final eval accuracy {summary['final_eval_accuracy']:.3f}" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert evals[0] < 0.5 <= evals[-1]  # it learned during the run, not before it
