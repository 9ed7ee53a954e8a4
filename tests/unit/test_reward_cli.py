"""`chorus reward score`: a researcher's inner loop, no cluster. Run as the installed console script, from the
researcher's own directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

CHORUS = str(Path(sys.executable).parent / "chorus")


def chorus(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHORUS, "reward", "score", *argv], cwd=cwd, capture_output=True, text=True, timeout=100)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_scores_each_row_with_components(tmp_path):
    schema = {"type": "object", "required": ["n"]}
    write_rows(tmp_path / "rows.jsonl", [
        {"prompt": "p", "response": '{"n": 2}', "schema": schema, "answer": {"n": 2}},
        {"prompt": "p", "response": '{"m": 2}', "schema": schema, "answer": {"n": 2}},
    ])
    proc = chorus(tmp_path, "json_schema", "rows.jsonl")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out[0]["score"] == pytest.approx(1.0)
    # row 2: parses 1, schema 0 (n required), keys 0, content 0 -> 0.1
    assert out[1]["score"] == pytest.approx(0.1)
    assert out[1]["components"] == pytest.approx({"json_schema.parses": 1.0, "json_schema.schema": 0.0,
                                                  "json_schema.keys": 0.0, "json_schema.content": 0.0,
                                                  "json_schema": 0.1})


def test_user_module_from_the_working_directory_with_args(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def longer_than(prompts, responses, *, n=3, **_):\n    return [float(len(r) > n) for r in responses]\n")
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "abcd"}, {"prompt": "p", "response": "ab"}])
    proc = chorus(tmp_path, "my_rewards:longer_than", "rows.jsonl", "--args", '{"n": 1}')
    assert [json.loads(line)["score"] for line in proc.stdout.splitlines()] == [1.0, 1.0]
    proc = chorus(tmp_path, "my_rewards:longer_than", "rows.jsonl")
    assert [json.loads(line)["score"] for line in proc.stdout.splitlines()] == [1.0, 0.0]


def test_a_failing_reward_is_reported_per_row_not_a_crash(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def broken(prompts, responses, **_):\n    raise ValueError('no')\n")
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r"}])
    proc = chorus(tmp_path, "my_rewards:broken", "rows.jsonl")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"score": 0.0, "components": {"my_rewards:broken": 0.0},
                                       "failed": ["my_rewards:broken"]}
    assert "raised ValueError: no" in proc.stderr


def test_bad_input_names_the_line_or_the_reward(tmp_path):
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r", "answer": "r"}, '{"prompt": "p",',
                                         {"prompt": "p"}])
    proc = chorus(tmp_path, "exact_match", "rows.jsonl")
    assert proc.returncode == 2 and "rows.jsonl:2: not valid JSON" in proc.stderr
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    proc = chorus(tmp_path, "exact_match", "rows.jsonl")
    assert proc.returncode == 2 and "rows.jsonl:2: field 'response'" in proc.stderr
    proc = chorus(tmp_path, "no_such_reward", "rows.jsonl")
    assert proc.returncode == 2 and "no_such_reward" in proc.stderr and "known:" in proc.stderr
    proc = chorus(tmp_path, "exact_match", "rows.jsonl", "--args", "[1]")
    assert proc.returncode == 2 and "--args" in proc.stderr
