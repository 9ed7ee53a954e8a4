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
    assert "model.path" in err and "nope" in err


def test_stray_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", SMOKE, "--bogus-flag"])
    assert "override 'stray': expected key=value" in _run(capsys, SMOKE, "stray")
