"""Checkpoint bookkeeping without a cluster: which directory is the newest complete checkpoint, what an unreadable
one says, which config changes a resume accepts, the metrics log's rollback, the counters' and the pending
rollouts' round trips. The DeepSpeed state itself is tested on the real stack (tests/integration/
test_fault_tolerance.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actors import checkpoint as ckpt
from actors.config import ConfigError, load_config, to_yaml
from actors.records import Rollouts, pack_rollouts, unpack_rollouts
from actors.metrics import JsonlLog, Metrics
from actors.scheduler import Scheduler, StepPlan
from rollout.types import Completion, Scored

ROOT = Path(__file__).resolve().parents[2]


def _write(root: Path, step: int, cfg=None, **state) -> Path:
    path = root / f"step-{step:08d}"
    (path / "learner").mkdir(parents=True)
    (path / "model").mkdir()
    (path / "config.yaml").write_text(to_yaml(cfg or load_config(ROOT / "configs" / "smoke.yaml")))
    state = {"step": step, "version": step, "plan_from": step, "scheduler": {}, "data": {}, "time": 0.0, **state}
    (path / "trainer.json").write_text(json.dumps(state))
    return path


def test_newest_complete_checkpoint_ignores_temporary_ones(tmp_path):
    assert ckpt.newest(tmp_path / "none") is None
    _write(tmp_path, 4)
    _write(tmp_path, 8)
    (tmp_path / ".tmp-step-00000012" / "learner").mkdir(parents=True)  # a checkpoint cut short by a kill
    (tmp_path / "step-12").mkdir()  # not a name the trainer writes
    path, state = ckpt.newest(tmp_path)
    assert path.name == "step-00000008" and state["step"] == 8


@pytest.mark.parametrize("damage, named", [
    (lambda p: (p / "trainer.json").write_text('{"step": 8, "vers'), "JSONDecodeError"),
    (lambda p: (p / "trainer.json").write_text('{"step": 8}'), "KeyError: 'version'"),
    (lambda p: (p / "trainer.json").unlink(), "FileNotFoundError"),
    (lambda p: (p / "learner").rmdir(), "learner is missing"),
])
def test_an_unreadable_newest_checkpoint_stops_the_start_naming_it(tmp_path, damage, named):
    _write(tmp_path, 4)
    damage(_write(tmp_path, 8))
    with pytest.raises(ConfigError) as err:
        ckpt.newest(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "step-00000008") in message and named in message
    assert "move it aside to resume from step-00000004" in message


def test_resume_accepts_sizes_and_limits_but_not_the_algorithm(tmp_path):
    path = _write(tmp_path, 4)
    smoke = ROOT / "configs" / "smoke.yaml"
    ckpt.check_resumable(load_config(smoke, ["train.steps=300", "rollout.num_actors=2", "rollout.deadline_s=60",
                                             "checkpoint.every=10", "metrics.port=9400"]), path)
    with pytest.raises(ConfigError) as err:
        ckpt.check_resumable(load_config(smoke, ["learner.lr=0.1", "train.steps=300"]), path)
    assert "'learner.lr' was 0.002, now 0.1" in str(err.value) and "train.steps" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'reward.functions' was"):
        ckpt.check_resumable(load_config(smoke, ["reward.functions=[{name: char_match}]"]), path)


def test_metrics_log_rollback_moves_later_records_and_a_cut_line_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in range(6)] + ['{"step": 6, "lo']  # killed mid-write
    path.write_text("\n".join(lines))
    log = JsonlLog(path, resume_step=4)
    log.write({"step": 4, "loss": 0.25})
    log.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines() == lines[4:]
    with pytest.raises(FileExistsError):  # without a resume, a run dir holds one run
        JsonlLog(path)


def test_counters_go_on_from_a_checkpoint():
    first, second = Metrics("127.0.0.1", 0), Metrics("127.0.0.1", 0)
    try:
        first.samples.inc(320)
        first.restarts.labels("rollout").inc(2)
        first.phase_total.labels("train").inc(1.5)
        second.restore_counters(first.counters())
        assert second.counters() == first.counters()
        assert second.samples._value.get() == 320 and second.restarts.labels("rollout")._value.get() == 2
    finally:
        first.close()
        second.close()


def test_pending_rollouts_round_trip_exactly():
    logprobs = [-0.1234567890123, -2.5e-9]
    r = Rollouts(plan=StepPlan(step=5, prompt_ids=[3, 9], expert_ids=[1], mu=0.25),
                 rows=[([1, 2], Completion(0, [7, 8], logprobs, "ab", "stop"))],
                 rewards=torch.tensor([0.1, 1 / 3]), scored=[Scored(0.1, {"exact_match": 0.1}, ["judge"])],
                 version=4, phase={"generate": 0.5}, dropped=[9], filtered=2, rounds=3, reward_mean=0.125)
    (back,) = unpack_rollouts(pack_rollouts([r]))
    assert back.plan == r.plan and back.rows == r.rows and back.rows[0][1].logprobs == logprobs
    assert torch.equal(back.rewards, r.rewards) and back.rewards.dtype == torch.float32
    assert (back.scored, back.version, back.phase, back.dropped) == (r.scored, 4, {"generate": 0.5}, [9])
    assert (back.filtered, back.rounds, back.reward_mean) == (2, 3, 0.125)


def test_rollouts_written_before_dynamic_sampling_still_load():
    import msgpack

    old = msgpack.packb([{"plan": {"step": 1, "prompt_ids": [0], "expert_ids": [], "mu": 0.0}, "rows": [],
                          "rewards": [0.5, 1.0], "scored": [], "version": 1, "phase": {}, "dropped": []}])
    (back,) = unpack_rollouts(old)
    assert (back.filtered, back.rounds, back.reward_mean) == (0, 1, 0.75)


def test_scheduler_state_restores_the_same_plans():
    cfg = load_config(ROOT / "configs" / "smoke.yaml").algo
    a = Scheduler(cfg, 8, 50, 40, seed=3)
    for step in range(7):  # past an epoch of both sets
        a.plan(step)
    b = Scheduler(cfg, 8, 50, 40, seed=3)
    b.load_state(json.loads(json.dumps(a.state())))  # through trainer.json
    assert [a.plan(s) for s in range(7, 12)] == [b.plan(s) for s in range(7, 12)]


def test_prune_keeps_the_newest(tmp_path):
    for step in (4, 8, 12):
        _write(tmp_path, step)
    stale = tmp_path / ".tmp-step-00000006"
    stale.mkdir()
    ckpt.prune(tmp_path, 2, current=tmp_path / ".tmp-step-00000012")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008", "step-00000012"]


# --- durability: the rename is on disk before older checkpoints go -------------------------------------------


def test_publish_fsyncs_the_directory_after_the_rename_and_before_pruning(tmp_path, monkeypatch):
    for step in (4, 8):
        _write(tmp_path, step)
    tmp = tmp_path / ".tmp-step-00000012"
    tmp.mkdir()
    final = tmp_path / "step-00000012"
    events = []
    fsync = ckpt.os.fsync

    def recording_fsync(fd):
        st, root = ckpt.os.fstat(fd), tmp_path.stat()
        what = "fsync root" if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino) else "fsync other"
        events.append((what, final.exists(), (tmp_path / "step-00000004").exists()))
        fsync(fd)

    prune = ckpt.prune
    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    monkeypatch.setattr(ckpt, "prune", lambda *a, **k: (events.append(("prune", final.exists(), None)), prune(*a, **k)))
    ckpt.publish(tmp, final, keep=2)
    # the directory is fsynced once the new name exists and while the oldest checkpoint is still there; then pruned
    assert events == [("fsync root", True, True), ("prune", True, None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008", "step-00000012"]


def test_fsync_dir_tolerates_a_file_system_that_cannot(tmp_path, monkeypatch, caplog):
    def einval(fd):
        raise OSError(ckpt.errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ckpt.os, "fsync", einval)
    ckpt.fsync_dir(tmp_path)  # warned about, not raised
    assert "cannot fsync directory" in caplog.text

    def eio(fd):
        raise OSError(ckpt.errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.os, "fsync", eio)
    with pytest.raises(OSError):
        ckpt.fsync_dir(tmp_path)


# --- where a run starts -----------------------------------------------------------------------------------------


def _run_dir(tmp_path: Path, steps: int, checkpoint_dir: str = "") -> Path:
    """A run dir as a run of ``steps`` logged steps leaves it: config.yaml (with its checkpoint.dir) and
    metrics.jsonl, its final evaluation's record (not a step) and a last line cut short by a kill."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"checkpoint.dir={checkpoint_dir}"] if checkpoint_dir else [])
    (run / "config.yaml").write_text(to_yaml(cfg))
    records = [{"step": s, "loss": 0.5} for s in range(steps)] + ([{"step": steps, "final": True}] if steps else [])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    return run


def test_resume_without_a_checkpoint_of_a_run_with_logged_steps_stops_saying_where_it_looked(tmp_path):
    smoke = load_config(ROOT / "configs" / "smoke.yaml")  # checkpoint.every 4: one was due after step 4
    run = _run_dir(tmp_path, 5)
    with pytest.raises(ConfigError) as err:
        ckpt.start_from(smoke, run, run / "checkpoints", resume=True)
    message = str(err.value)
    assert f"no complete checkpoint in {run / 'checkpoints'} (the default, RUN_DIR/checkpoints)" in message
    assert f"{run / 'metrics.jsonl'} holds 5 step records" in message and "move metrics.jsonl aside" in message
    assert not (run / "metrics.rolled_back.jsonl").exists()


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    # a KubeRay retry: 3 steps logged, checkpoint.every 4, the same checkpoint dir: nothing was lost, start again
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    run = _run_dir(tmp_path, 3)
    assert ckpt.start_from(smoke, run, run / "checkpoints", resume=True) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):  # but not with another checkpoint dir
        ckpt.start_from(smoke, run, tmp_path / "elsewhere", resume=True)
    no_periodic = load_config(ROOT / "configs" / "smoke.yaml", ["checkpoint.every=0"])
    (tmp_path / "b").mkdir()
    assert ckpt.start_from(no_periodic, _run_dir(tmp_path / "b", 50), tmp_path / "b" / "run" / "checkpoints",
                           resume=True) is None


def test_resume_with_a_changed_checkpoint_dir_names_both_dirs(tmp_path):
    # the run wrote its checkpoints to old/; the resume is given new/ (empty): it names new/ and finds old/
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old, 4)
    run = _run_dir(tmp_path, 5, checkpoint_dir=str(old))
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"checkpoint.dir={new}"])
    with pytest.raises(ConfigError) as err:
        ckpt.start_from(cfg, run, new, resume=True)
    message = str(err.value)
    assert f"no complete checkpoint in {new} (checkpoint.dir = {new})" in message
    assert f"{old} holds step-00000004" in message
    # and the other way round: the run used the default, the resume points elsewhere
    run2 = tmp_path / "run2"
    run2.mkdir()
    _write(run2 / "checkpoints", 2)
    (run2 / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    with pytest.raises(ConfigError, match=f"{run2 / 'checkpoints'} holds step-00000002"):
        ckpt.start_from(cfg, run2, new, resume=True)


@pytest.mark.parametrize("log", [None, "", '{"step": 0, "lo'])
def test_resume_of_a_run_dir_with_no_logged_step_starts_from_step_0(tmp_path, log):
    # how the KubeRay job starts a fresh run: always --resume; a first try killed before its first step is alike
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    run = tmp_path / "run"
    run.mkdir()
    if log is not None:
        (run / "metrics.jsonl").write_text(log)
    assert ckpt.start_from(smoke, run, run / "checkpoints", resume=True) is None
    assert ckpt.start_from(smoke, tmp_path / "absent", tmp_path / "absent" / "checkpoints", resume=True) is None


def test_start_finds_the_checkpoint_or_refuses_to_mix_runs(tmp_path):
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    run = _run_dir(tmp_path, 5)
    _write(run / "checkpoints", 4)
    path, state = ckpt.start_from(smoke, run, run / "checkpoints", resume=True)
    assert path.name == "step-00000004" and state["step"] == 4
    with pytest.raises(ConfigError, match="already holds a run"):  # no --resume on a run dir with a run
        ckpt.start_from(smoke, run, run / "checkpoints", resume=False)
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # nor on another run's checkpoint dir
        ckpt.start_from(smoke, tmp_path / "fresh", run / "checkpoints", resume=False)
    with pytest.raises(ConfigError, match="'train.steps': 3 is fewer than the 4"):
        ckpt.start_from(load_config(ROOT / "configs" / "smoke.yaml", ["train.steps=3"]), run, run / "checkpoints",
                        resume=True)


def test_a_checkpoint_config_that_no_longer_validates_is_named(tmp_path):
    # a run written before a check existed (here reward.timeout_s 0, refused since): the resume names the file
    path = _write(tmp_path, 4)
    text = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text(text.replace("timeout_s: 10.0", "timeout_s: 0.0", 1))
    assert (path / "config.yaml").read_text() != text
    with pytest.raises(ConfigError) as err:
        ckpt.check_resumable(load_config(ROOT / "configs" / "smoke.yaml"), path)
    message = str(err.value)
    assert "checkpoint step-00000004: the config it was written with no longer loads" in message
    assert "'reward.timeout_s'" in message and str(path / "config.yaml") in message
