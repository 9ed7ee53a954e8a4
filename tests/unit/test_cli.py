"""Bad input stops `chorus train` before anything starts, with exit code 2 and a message naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _run(capsys, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    return capsys.readouterr().err


def test_unknown_key_names_its_path(capsys):
    err = _run(capsys, SMOKE, "algo.mu_peek=0.3")
    assert "config error" in err and "algo.mu_peek" in err


def test_wrong_type_names_its_path(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(SMOKE).read_text().replace("\n  steps: 150", "\n  steps: many"))
    err = _run(capsys, str(bad))
    assert "train.steps" in err and str(bad) in err


def test_unknown_reward_names_the_list_entry(capsys, tmp_path):
    err = _run(capsys, SMOKE, "--run-dir", str(tmp_path / "run"), "reward.functions=[{name: no_such_reward}]")
    assert "reward.functions[0].name" in err and "no_such_reward" in err


def test_malformed_data_row_names_file_and_line(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ab=", "answer": "ba"}\n{"prompt": "cd=", "answer": \n')
    err = _run(capsys, SMOKE, "--run-dir", str(tmp_path / "run"), "data.synthetic=null",
               f"data.prompts={prompts}", f"data.eval={prompts}", "algo.expert_ratio=0",
               "algo.mu_peak=0", "algo.mu_valley=0")
    assert f"{prompts}:2" in err and "data error" in err


def test_missing_model_dir_is_a_config_error(capsys, tmp_path):
    err = _run(capsys, SMOKE, "--run-dir", str(tmp_path / "run"), "model.build=''", f"model.path={tmp_path}/nope")
    assert "model.path" in err and f"'{tmp_path}/nope' does not exist" in err and "set it to a Hugging Face" in err


def _run_dir_with_checkpoint(tmp_path: Path) -> Path:
    """A run dir as a killed run leaves it: metrics.jsonl, and a checkpoint of step 4 written with smoke.yaml."""
    from actors.config import load_config, to_yaml

    run = tmp_path / "run"
    path = run / "checkpoints" / "step-00000004"
    (path / "learner").mkdir(parents=True)
    (path / "model").mkdir()
    (path / "config.yaml").write_text(to_yaml(load_config(SMOKE)))
    (path / "trainer.json").write_text('{"step": 4, "version": 4, "plan_from": 4, "scheduler": {}, "data": {}}')
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    return run


def test_a_run_dir_holding_a_run_needs_resume(capsys, tmp_path):
    run = _run_dir_with_checkpoint(tmp_path)
    err = _run(capsys, SMOKE, "--run-dir", str(run))
    assert "already holds a run" in err and "--resume" in err
    assert "--resume needs --run-dir" in _run(capsys, SMOKE, "--resume")


def test_resume_with_a_changed_algorithm_names_the_key(capsys, tmp_path):
    run = _run_dir_with_checkpoint(tmp_path)
    err = _run(capsys, SMOKE, "--run-dir", str(run), "--resume", "algo.clip_eps=0.3", "train.steps=400")
    assert "'algo.clip_eps' was 0.2, now 0.3" in err and "step-00000004" in err and "train.steps" not in err


def test_resume_from_an_unreadable_checkpoint_names_it(capsys, tmp_path):
    run = _run_dir_with_checkpoint(tmp_path)
    (run / "checkpoints" / "step-00000004" / "trainer.json").write_text("{\"step\": 4, ")  # cut short
    err = _run(capsys, SMOKE, "--run-dir", str(run), "--resume")
    assert f"checkpoint {run}/checkpoints/step-00000004 is unreadable (JSONDecodeError" in err


def test_stray_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", SMOKE, "--bogus-flag"])
    assert "override 'stray': expected key=value" in _run(capsys, SMOKE, "stray")


def test_resume_with_fewer_steps_than_the_checkpoint_names_train_steps(capsys, tmp_path):
    run = _run_dir_with_checkpoint(tmp_path)
    err = _run(capsys, SMOKE, "--run-dir", str(run), "--resume", "train.steps=3")
    assert "'train.steps': 3 is fewer than the 4 steps checkpoint" in err


def test_a_new_run_refuses_a_checkpoint_dir_holding_another_runs_checkpoints(capsys, tmp_path):
    shared = _run_dir_with_checkpoint(tmp_path) / "checkpoints"  # e.g. a checkpoint.dir two runs were given
    err = _run(capsys, SMOKE, "--run-dir", str(tmp_path / "other"), f"checkpoint.dir={shared}")
    assert f"checkpoint dir {shared} already holds checkpoints" in err
