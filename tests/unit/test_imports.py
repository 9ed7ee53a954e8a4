"""Convention 7: the maths, the data code, the rewards and the scheduler import without ray, vllm or deepspeed
(the learner module too: deepspeed is imported when the actor sets up)."""

from __future__ import annotations

import subprocess
import sys

LEARNERS = ["learners.registry", "learners.losses", "learners.advantages", "learners.schedules", "learners.sampling",
            "learners.batch", "learners.learner", "learners.critic", "learners.reference"]
LIGHT = [*LEARNERS, "actors.config", "actors.scheduler", "actors.records", "rollout.data", "rollout.types",
         "rewards.registry", "rewards.rules", "rewards.actor"]


def _loaded_after(modules: list[str]) -> set[str]:
    """The modules a fresh interpreter holds after importing ``modules``."""
    code = (f"import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(' '.join(sys.modules))\n")
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_light_modules_do_not_import_heavy_frameworks():
    assert {"ray", "vllm", "deepspeed"} & _loaded_after(LIGHT) == set()


REWARDS = ["rewards.registry", "rewards.rules", "rewards.actor", "rewards.isolation", "rewards.similarity",
           "rewards.structured", "rewards.checks", "rewards.execution", "rewards.sandbox", "rewards.judge"]


def test_learners_and_rewards_do_not_import_the_actors_package():
    """The maths and the rewards sit below the driver: they take their config sections and loss spec as arguments,
    so the driver's modules can import them without a cycle."""
    loaded = _loaded_after(LEARNERS + REWARDS)
    assert sorted(m for m in loaded if m == "actors" or m.startswith("actors.")) == []
