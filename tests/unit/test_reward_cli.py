"""`chorus reward score`: a researcher's inner loop, no cluster. Run as the installed console script, from the
researcher's own directory."""

from __future__ import annotations

import json
import shutil
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


def test_the_reward_template_runs_as_the_readme_says(tmp_path):
    """examples/reward_template.py, copied into a researcher's folder: each of its three shapes scores by hand."""
    shutil.copy(Path(__file__).resolve().parents[2] / "examples" / "reward_template.py", tmp_path)
    write_rows(tmp_path / "rows.jsonl", [
        {"prompt": "capital?", "response": "Answer: Paris", "answer": "paris"},
        {"prompt": "capital?", "response": "paris", "answer": "Paris"},
    ])
    proc = chorus(tmp_path, "reward_template:keyword_hits", "rows.jsonl", "--args", '{"keywords": ["paris", "france"]}')
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    # one keyword of two, short: 0.8 * 0.5 + 0.2 * 1 = 0.6, for both rows
    assert [o["score"] for o in out] == pytest.approx([0.6, 0.6])
    assert out[0]["components"]["reward_template:keyword_hits.hits"] == pytest.approx(0.5)
    proc = chorus(tmp_path, "reward_template:right_answer", "rows.jsonl")
    assert [json.loads(line)["score"] for line in proc.stdout.splitlines()] == [0.0, 1.0]
    proc = chorus(tmp_path, "reward_template:StartsWith", "rows.jsonl", "--args", '{"prefix": "Answer:"}')
    assert [json.loads(line)["score"] for line in proc.stdout.splitlines()] == [1.0, 0.0]


@pytest.mark.parametrize("name, content, where, reason", [
    ("rows.jsonl", b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n', "rows.jsonl:2",
     "not valid UTF-8"),
    ("rows.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "rows.jsonl:1", "JSON nested too deeply to read"),
    ("rows.jsonl", b'{"prompt": "p", "response": "r"}\n"r"\n', "rows.jsonl:2", "a row must be a JSON object"),
    ("rows.jsonl", b"", "rows.jsonl", "no rows"),
    ("rows.parquet", b"PAR1 not really parquet PAR1", "rows.parquet", "not a readable Parquet file"),
])
def test_a_bad_file_names_file_line_and_reason_without_a_traceback(tmp_path, name, content, where, reason):
    (tmp_path / name).write_bytes(content)
    proc = chorus(tmp_path, "exact_match", name)
    assert proc.returncode == 2, proc.stderr
    assert f"chorus: data error: {where}: {reason}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""


@pytest.mark.parametrize("option, value, must", [
    ("--batch", "0", "must be a whole number of rows >= 1, got '0'"),
    ("--batch", "-5", "must be a whole number of rows >= 1, got '-5'"),
    ("--timeout", "0", "must be a finite number of seconds > 0, got '0'"),
    ("--timeout", "-1", "must be a finite number of seconds > 0, got '-1'"),
    ("--timeout", "nan", "must be a finite number of seconds > 0, got 'nan'"),
    ("--timeout", "inf", "must be a finite number of seconds > 0, got 'inf'"),
])
def test_batch_and_timeout_that_mean_nothing_are_refused(tmp_path, option, value, must):
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r", "answer": "r"}])
    proc = chorus(tmp_path, "exact_match", "rows.jsonl", f"{option}={value}")
    assert proc.returncode == 2 and f"argument {option}: {must}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
