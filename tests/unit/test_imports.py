"""Convention 7: the maths, the data code, the rewards and the scheduler import without ray, vllm or deepspeed
(the learner module too: deepspeed is imported when the actor sets up)."""

from __future__ import annotations

import subprocess
import sys

LIGHT = ["learners.losses", "learners.advantages", "learners.batch", "learners.learner", "actors.config",
         "actors.scheduler", "rollout.data", "rollout.types", "rewards.registry", "rewards.rules", "rewards.actor"]


def test_light_modules_do_not_import_heavy_frameworks():
    code = (
        f"import sys, importlib\n"
        f"for m in {LIGHT!r}: importlib.import_module(m)\n"
        f"print(sorted({{'ray', 'vllm', 'deepspeed'}} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
