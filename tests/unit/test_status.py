"""`chorus status`: the figures it prints for a hand-made run dir, its checkpoints, and a live endpoint's counters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from actors.cli import main
from actors.config import load_config, to_yaml
from actors.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def _record(step: int, seconds: float, samples: int, **extra) -> dict:
    return {"step": step, "mu": 0.1, "reward_mean": 0.25, "loss": 1.0, "samples": samples, "tokens": 10 * samples,
            "step_seconds": seconds, **extra}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run 25 steps into 100, killed mid-write: 5 slow steps, then 20 that alternate (20 s, 64 samples) and
    (40 s, 32 samples); an evaluation after step 20; no reward on the last step (an SFT-only step)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(ROOT / "configs" / "cluster_7b.yaml", ["train.steps=100"])  # checkpoint.dir "" = run/checkpoints
    (run / "config.yaml").write_text(to_yaml(cfg))
    records = [_record(i, 100.0, 8, reward_mean=0.9) for i in range(5)]
    records += [_record(i, 20.0, 64) if i % 2 else _record(i, 40.0, 32) for i in range(5, 25)]
    records[19]["eval_accuracy"] = 0.75  # step index 19: the evaluation after 20 steps
    records[23]["reward_mean"] = 0.5
    records[24]["reward_mean"] = None
    lines = [json.dumps(r) for r in records] + ['{"step": 25, "mu": 0.1, "reward_m']  # the crash's half line
    (run / "metrics.jsonl").write_text("\n".join(lines))
    ckpts, now = run / "checkpoints", time.time()
    for name in ("step-00000010", "step-00000020", "step-00000024", ".tmp-step-00000025"):
        (ckpts / name).mkdir(parents=True)
    (ckpts / "step-00000010" / "trainer.json").write_text(
        json.dumps({"step": 10, "time": now - 7200, "reason": "periodic"}))
    (ckpts / "step-00000020" / "trainer.json").write_text(
        json.dumps({"step": 20, "time": now - 600, "reason": "periodic"}))
    (ckpts / "step-00000024" / "trainer.json").write_text('{"step": 24, "ti')  # unreadable
    (ckpts / ".tmp-step-00000025" / "trainer.json").write_text(json.dumps({"step": 25, "time": now}))
    return run


def _json(capsys, *argv: str) -> dict:
    assert main(["status", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_progress_rates_and_checkpoints(run_dir, capsys):
    s = _json(capsys, str(run_dir))
    assert s["steps_done"] == 25 and s["steps_total"] == 100 and s["percent"] == 25.0 and not s["finished"]
    # the last 20 records (indices 5..24): 10 x 20 s + 10 x 40 s = 600 s; 10 x 64 + 10 x 32 = 960 samples
    r = s["rates"]
    assert r["steps"] == 20 and r["seconds"] == 600.0
    assert r["steps_per_min"] == pytest.approx(60 * 20 / 600)  # 2.0
    assert r["samples_per_s"] == pytest.approx(960 / 600)  # 1.6
    assert r["tokens_per_s"] == pytest.approx(9600 / 600)  # 16.0
    assert s["eta_s"] == pytest.approx(75 / 2.0 * 60)  # 75 steps left at 2 a minute: 2250 s
    assert s["reward_mean"] == {"step": 24, "value": 0.5}  # step 24's record has none: the one before
    assert s["eval_accuracy"] == {"step": 20, "value": 0.75}
    assert s["checkpoint_dir"] == str(run_dir / "checkpoints")
    assert [c["name"] for c in s["checkpoints"]] == ["step-00000024", "step-00000020", "step-00000010"]
    assert "unreadable" in s["checkpoints"][0]["error"]
    newest = s["newest_checkpoint"]
    assert newest["name"] == "step-00000020" and newest["step"] == 20 and newest["reason"] == "periodic"
    assert newest["age_s"] == pytest.approx(600, abs=60)
    assert s["endpoint"] == {"url": None, "live": False, "error": "no metrics_url in the run dir"}


def test_text_output(run_dir, capsys):
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step 25 / 100 (25.0%), not finished" in out
    assert "2.00 steps/min, 1.60 samples/s, 16.0 tokens/s (last 20 steps" in out and "ETA 37 min" in out
    assert "reward      0.5000 (after step 24)" in out and "eval acc    0.7500 (after step 20)" in out
    assert "step-00000020: periodic, written 10 min ago" in out
    assert "step-00000024: trainer.json unreadable" in out and ".tmp-" not in out
    assert "does not answer (run not live)" in out


def test_finished_run_and_checkpoint_dir_from_config(tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "shared" / "ckpt"
    run.mkdir()
    cfg = load_config(ROOT / "configs" / "cluster_7b.yaml", ["train.steps=2", f"checkpoint.dir={elsewhere}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    records = [_record(0, 10.0, 4), _record(1, 20.0, 2, eval_accuracy=0.5),
               {"step": 2, "eval_accuracy": 0.625, "final": True}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (elsewhere / "step-00000002").mkdir(parents=True)
    state = {"step": 2, "time": time.time(), "reason": "final"}
    (elsewhere / "step-00000002" / "trainer.json").write_text(json.dumps(state))
    s = _json(capsys, str(run))
    assert s["finished"] and s["steps_done"] == 2 and s["percent"] == 100.0 and s["eta_s"] is None
    assert s["rates"]["steps_per_min"] == pytest.approx(60 * 2 / 30)  # the final line is no step
    assert s["eval_accuracy"] == {"step": 2, "value": 0.625}
    assert s["newest_checkpoint"]["name"] == "step-00000002" and s["newest_checkpoint"]["reason"] == "final"


def test_live_endpoint_counters(run_dir, capsys):
    m = Metrics("127.0.0.1", 0)
    try:
        m.step.set(25)
        m.restarts.labels("rollout").inc(2)
        m.restarts.labels("learner").inc()
        m.deadlines.labels("reward").inc()
        m.reward_failures.labels("math").inc(3)
        (run_dir / "metrics_url").write_text(m.url + "\n")
        e = _json(capsys, str(run_dir))["endpoint"]
        assert e["live"] and e["url"] == m.url and e["step"] == 25
        assert e["restarts"] == {"rollout": 2, "reward": 0, "env": 0, "reference": 0, "learner": 1, "critic": 0}
        assert e["deadlines_exceeded"]["reward"] == 1 and e["reward_failures"] == {"math": 3}
        assert main(["status", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert "restarts    rollout 2, reward 0, reference 0, learner 1, critic 0" in out
        assert "reward failures  math 3" in out
        assert main(["status", "--url", m.url]) == 0  # the endpoint alone
        out = capsys.readouterr().out
        assert f"endpoint    {m.url} live, step 25" in out and "checkpoint  step 0" in out and "run " not in out
    finally:
        m.close()


def test_endpoint_that_does_not_answer(run_dir, capsys):
    m = Metrics("127.0.0.1", 0)
    url = m.url
    m.close()  # nothing listens there any more
    (run_dir / "metrics_url").write_text(url + "\n")
    t = time.monotonic()
    assert main(["status", str(run_dir)]) == 0  # the run dir still has plenty to say
    assert time.monotonic() - t < 10
    assert f"endpoint    {url} does not answer (run not live)" in capsys.readouterr().out
    assert main(["status", "--url", url]) == 1  # the endpoint alone: nothing to report


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_run_dir_is_exit_2(tmp_path, capsys, make):
    run = tmp_path / "no-such-run"
    if make == "empty":
        run.mkdir()
    assert main(["status", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and ("does not exist" if make == "missing" else "holds no chorus run") in err


def test_no_run_dir_and_no_url_is_exit_2(capsys):
    assert main(["status"]) == 2
    assert "give a run dir" in capsys.readouterr().err
