"""`chorus train`, run from a researcher's own directory, finds a reward named `my_rewards:fn` in a module there,
as `python -m` would, and the reward actors score with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CHORUS = str(Path(sys.executable).parent / "chorus")  # the console script: its sys.path[0] is bin/, not the cwd

MODULE = '''
def quarter(prompts, responses, **_):
    return [0.25 for _ in responses]
'''


def test_reward_module_in_the_working_directory(tmp_path):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [CHORUS, "train", str(ROOT / "configs" / "from_scratch" / "reverse.yaml"), "--run-dir", str(run_dir),
         f"model.build={ROOT / 'configs' / 'models' / 'tiny_llama.json'}", "train.steps=2",
         "data.synthetic.num_eval=10",
         "algo.mu_peak=0.5",  # mu < 1, so every step has on-policy samples to score
         "reward.functions=[{name: 'my_rewards:quarter'}]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"final"' not in line]
    assert [r["reward_mean"] for r in steps] == [0.25, 0.25]  # exact_match would give 0.0 from an untrained model
