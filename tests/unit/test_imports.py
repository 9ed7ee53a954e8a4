"""Convention 7: the maths, the data code and the scheduler import without ray, vllm or deepspeed."""

from __future__ import annotations

import subprocess
import sys

LIGHT = ["learners.losses", "learners.advantages", "learners.batch", "actors.config", "actors.scheduler",
         "rollout.data"]


def test_light_modules_do_not_import_heavy_frameworks():
    code = (
        f"import sys, importlib\n"
        f"for m in {LIGHT!r}: importlib.import_module(m)\n"
        f"print(sorted({{'ray', 'vllm', 'deepspeed'}} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
