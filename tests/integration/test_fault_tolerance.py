"""Long jobs on the real stack (Ray, vLLM, DeepSpeed), `chorus train configs/smoke.yaml` run as a process of its own:
exact resume after SIGKILL and after SIGTERM, and one run that survives a killed rollout actor, a killed learner and
a stuck engine. Each is compared with an uninterrupted run of the same seed, step by step.

With mu = 0.5 and a partial-credit reward (char_match), every step's RL loss depends on the sampled tokens and the
SFT loss on the weights: a run that sampled anything else, lost or repeated a sample, or trained from another state
would log other losses. smoke.yaml checkpoints every 4 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors import checkpoint as ckpt
from tests.procs import alive, descendants, wait_dead, with_cmdline

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
CHORUS = str(Path(sys.executable).parent / "chorus")
STEPS = 12
ARGS = [f"train.steps={STEPS}", "train.eval_every=0", "algo.mu_peak=0.5", "algo.mu_valley=0.5",
        "reward.functions=[{name: char_match}]"]
LOSSES = ("loss", "rl_loss", "sft_loss", "kl", "entropy", "grad_norm", "reward_mean")


class Run:
    """`chorus train` in a session of its own, its output in RUN_DIR.log."""

    def __init__(self, run_dir: Path, *extra: str, resume: bool = False):
        self.run_dir = run_dir
        self.out = run_dir.with_suffix(".log")
        cmd = [CHORUS, "train", "configs/smoke.yaml", "--run-dir", str(run_dir), *ARGS, *extra]
        with self.out.open("a") as out:
            self.proc = subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_step(self, step: int, timeout_s: float = 240) -> None:
        """Until metrics.jsonl has the record of ``step`` (polled every 20 ms: steps take ~0.4 s here)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(r["step"] >= step for r in records(self.run_dir)):
                return
            assert self.proc.poll() is None, f"the run ended early:\n{self.log()[-3000:]}"
            time.sleep(0.02)
        raise AssertionError(f"no step {step} within {timeout_s}s:\n{self.log()[-3000:]}")

    def wait(self, timeout_s: float = 300) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within {timeout_s}s:\n{self.log()[-3000:]}") from None

    def tree(self) -> list[int]:
        """The run's processes: the driver and everything under it (Ray's raylet, workers, vLLM's engine)."""
        return descendants(self.proc.pid)

    def kill(self) -> list[int]:
        pids = self.tree()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        return pids

    def log(self) -> str:
        return self.out.read_text(errors="replace")


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if not r.get("final"):
            out.append(r)
    return out


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert (g["samples"], g["tokens"], g["expert_rows"]) == (w["samples"], w["tokens"], w["expert_rows"]), g
        for key in LOSSES:
            assert g[key] == pytest.approx(w[key], abs=1e-5), (g["step"], key, g[key], w[key])


def ray_actors(name: str) -> list[int]:
    return with_cmdline(f"ray::{name}".encode(), prefix=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = Run(tmp_path_factory.mktemp("reference") / "run")
    assert run.wait() == 0, run.log()[-3000:]
    return run.run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> list[dict]:
    got = records(reference_run)
    assert len(got) == STEPS and 0 < got[-1]["reward_mean"]
    return got


@pytest.mark.timeout(600)
def test_resume_after_sigkill_logs_the_same_losses(reference, tmp_path):
    run = Run(tmp_path / "run")
    run.wait_for_step(5)  # the checkpoint of step 4 is in place, and at least one step after it is logged
    pids = run.kill()
    assert wait_dead(pids, 60), [p for p in pids if alive(p)]
    killed = records(run.run_dir)
    newest = ckpt.complete(run.run_dir / "checkpoints")[-1]
    k = int(newest.name.split("-")[1])
    assert 4 <= k < STEPS and k % 4 == 0 and len(killed) >= k  # steps logged past the checkpoint are redone

    resumed = Run(run.run_dir, resume=True)
    assert resumed.wait() == 0, resumed.log()[-3000:]
    assert f"from step {k};" in resumed.log()
    assert_same_steps(records(run.run_dir), reference)
    # what the killed run logged after its checkpoint moved aside, and matched the uninterrupted run too
    rolled = records(run.run_dir, "metrics.rolled_back.jsonl")
    assert [r["step"] for r in rolled] == list(range(k, len(killed)))
    assert_same_steps(rolled, reference[k:len(killed)])
    assert not list((run.run_dir / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in ckpt.complete(run.run_dir / "checkpoints")] == ["step-00000008", "step-00000012"]


@pytest.mark.timeout(600)
def test_sigterm_checkpoints_and_exits_143_then_resume_logs_the_same_losses(reference, tmp_path):
    run = Run(tmp_path / "run", "checkpoint.every=0")  # no periodic checkpoints: the one on SIGTERM is all there is
    run.wait_for_step(2)
    pids = run.tree()
    run.proc.send_signal(signal.SIGTERM)  # the driver alone, as Kubernetes does to a container's main process
    assert run.wait(120) == 143, run.log()[-3000:]
    assert wait_dead(pids, 60), [p for p in pids if alive(p)]  # it shut down what it started
    path, state = ckpt.newest(run.run_dir / "checkpoints")
    steps = len(records(run.run_dir))
    assert state["reason"] == "sigterm" and state["step"] == steps >= 3 and path.name == f"step-{steps:08d}"
    assert f"stopped by SIGTERM after step {steps}" in run.log() and "--resume" in run.log()
    assert (path / "model" / "model.safetensors").is_file() and (path / "model" / "tokenizer_config.json").is_file()

    resumed = Run(run.run_dir, "checkpoint.every=0", resume=True)
    assert resumed.wait() == 0, resumed.log()[-3000:]
    assert_same_steps(records(run.run_dir), reference)
    assert not (run.run_dir / "metrics.rolled_back.jsonl").exists()  # nothing was logged past the checkpoint


@pytest.mark.timeout(900)
def test_run_survives_a_killed_rollout_actor_a_killed_learner_and_a_stuck_engine(reference, tmp_path):
    run = Run(tmp_path / "run", "rollout.deadline_s=20")
    try:
        run.wait_for_step(1)
        (rollout,) = ray_actors("RolloutActor")
        os.kill(rollout, signal.SIGKILL)  # Ray restarts it; the step's generation is retried on the new engine
        run.wait_for_step(5)  # past the checkpoint of step 4
        (learner,) = ray_actors("LearnerActor")
        os.kill(learner, signal.SIGKILL)  # the learner group restarts from the checkpoint
        run.wait_for_step(9)
        (rollout,) = ray_actors("RolloutActor")
        os.kill(rollout, signal.SIGSTOP)  # generation hangs: past rollout.deadline_s the actor is killed
        assert run.wait(600) == 0, run.log()[-3000:]
    finally:
        if run.proc.poll() is None:
            run.kill()
    assert_same_steps(records(run.run_dir), reference)  # no sample lost, none counted twice, nothing else changed
    log = run.log()
    assert "restarting the learner groups from checkpoint" in log and "(failure 1 of at most 3)" in log
    assert "a call ran past rollout.deadline_s = 20s; killing the actor" in log
    _, final = ckpt.newest(run.run_dir / "checkpoints")
    counters = {(name, tuple(labels.values())): value for name, labels, value in final["counters"]}
    assert counters[("chorus_actor_restarts_total", ("rollout",))] == 2  # the kill, and the stuck one
    assert counters[("chorus_actor_restarts_total", ("learner",))] == 1
    assert counters[("chorus_deadline_exceeded_total", ("rollout",))] == 1
    # samples of steps logged and then rolled back with the learner were generated twice, and counted so
    redone = records(run.run_dir, "metrics.rolled_back.jsonl")  # none if the kill fell between checkpoint and log
    assert all(r["step"] >= 4 for r in redone)
    assert counters[("chorus_samples_generated_total", ())] == sum(r["samples"] for r in reference + redone)


@pytest.mark.timeout(300)
def test_resume_from_a_damaged_learner_state_stops_at_start_naming_the_checkpoint(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    path = ckpt.complete(run_dir / "checkpoints")[-1]
    # one learner rank trains at ZeRO stage 0: its weights and AdamW state are in this one file
    state = path / "learner" / "state" / "mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a disk that lost the end of the file
    run = Run(run_dir, f"train.steps={STEPS + 4}", resume=True)
    assert run.wait(240) == 2, run.log()[-3000:]
    assert f"config error: checkpoint {path}: cannot load the learner state" in run.log()
