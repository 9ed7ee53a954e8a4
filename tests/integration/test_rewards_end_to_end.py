"""Every built-in reward on the path training uses: `chorus reward score` builds the reward actor, which runs the
reward in its own process, which runs model-written code in the sandbox; as root (CI, these machines) and as the
Dockerfile's ordinary user. Correct answers score 1, wrong ones 0, hostile ones 0 beside them, and no row fails. (A data
file holding a lone surrogate is refused with its line; rewards/actor's own tests feed one to the reward process.)

This is the test that was missing when, as root, every code_exec, sql_exec and math answer scored 0 (the sandbox's
uid could not open the harness) with every unit test green. The LLM judge is left to tests/integration/test_judge.py:
it needs a vLLM engine of its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.users import ROOT, as_user, readable_dir, user_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCHEMA = "CREATE TABLE emp (name TEXT, dept TEXT, salary REAL);\n" \
         "INSERT INTO emp VALUES ('ann', 'ops', 100), ('bob', 'ops', 80), ('cid', 'dev', 120);"
IO_TESTS = [{"input": "2\n", "output": "4"}, {"input": "21\n", "output": "42"}]
ASSERTS = ["assert double(2) == 4", "assert double(-3) == -6"]
JSON_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
HUGE = "1" * 5000

# reward -> (its --args, [(row, expected score)]): correct rows first, then wrong, then hostile
CASES = {
    "exact_match": ({}, [({"response": " cba ", "answer": "cba"}, 1.0), ({"response": "abc", "answer": "cba"}, 0.0),
                         ({"response": "\n" * 100_000, "answer": "cba"}, 0.0)]),
    "char_match": ({}, [({"response": "cba", "answer": "cba"}, 1.0), ({"response": "xyz", "answer": "cba"}, 0.0)]),
    "choice": ({}, [({"response": "The answer is (b).", "answer": "B"}, 1.0),
                    ({"response": "Answer: C", "answer": "B"}, 0.0),
                    ({"response": "\n" * 20_000 + "x", "answer": "B"}, 0.0),
                    ({"response": "answer: " * 20_000, "answer": "B"}, 0.0)]),
    "length_penalty": ({"target": 2, "limit": 6}, [({"response": "a b"}, 1.0), ({"response": "a " * 50}, 0.0),
                                                   ({"response": " " * 100_000}, 1.0)]),
    "json_schema": ({}, [({"response": '{"n": 2}', "schema": JSON_SCHEMA, "answer": {"n": 2}}, 1.0),
                         ({"response": "n is two", "schema": JSON_SCHEMA, "answer": {"n": 2}}, 0.0),
                         ({"response": '{"n": ' + HUGE + "}", "schema": JSON_SCHEMA, "answer": {"n": 2}}, 0.0),
                         ({"response": "[" * 100_000, "schema": JSON_SCHEMA, "answer": {"n": 2}}, 0.0)]),
    "math": ({"per_item_s": 1}, [({"response": "So it is \\boxed{\\frac{1}{2}}", "answer": "0.5"}, 1.0),
                                 ({"response": "so x = 0.25", "answer": "0.5"}, 0.0),
                                 ({"response": "The answer is 9**9**9**9", "answer": "1"}, 0.0),
                                 ({"response": "\\boxed{9^{9^{9^{9}}}}", "answer": "2"}, 0.0)]),
    "code_exec": ({}, [({"response": "```python\nprint(int(input()) * 2)\n```", "tests": IO_TESTS}, 1.0),
                       ({"response": "def double(x):\n    return 2 * x", "tests": ASSERTS}, 1.0),
                       ({"response": "print(int(input()) * 3)", "tests": IO_TESTS}, 0.0),
                       ({"response": "def double(x):\n    return x", "tests": ASSERTS}, 0.0),
                       ({"response": "class A:\n    __eq__ = lambda s, o: True\ndef double(x):\n    return A()",
                         "tests": ASSERTS}, 0.0),
                       ({"response": "`" * 80_000, "tests": ASSERTS}, 0.0)]),
    "sql_exec": ({}, [({"response": "```sql\nSELECT dept, AVG(salary) FROM emp GROUP BY dept\n```", "schema": SCHEMA,
                        "answer": "SELECT dept, SUM(salary) / COUNT(*) FROM emp GROUP BY dept"}, 1.0),
                      ({"response": "SELECT dept, MAX(salary) FROM emp GROUP BY dept", "schema": SCHEMA,
                        "answer": "SELECT dept, AVG(salary) FROM emp GROUP BY dept"}, 0.0),
                      ({"response": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
                        "schema": SCHEMA, "answer": "SELECT 1"}, 0.0)]),
}


@pytest.fixture(scope="module")
def home():
    path = readable_dir("chorus-rewards-e2e-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=["root", "user"])
def chorus(request, home):
    """The `chorus` command as root, or as uid 1000 with an interpreter that user can execute."""
    if request.param == "root":
        return lambda argv: subprocess.run([sys.executable, "-m", "actors.cli", *argv], cwd=ROOT,
                                           capture_output=True, text=True, timeout=200)
    python = user_python(home / "py")
    return lambda argv: as_user([str(python), "-m", "actors.cli", *argv], home=home, timeout=200)


@pytest.mark.parametrize("reward", list(CASES))
def test_builtin_reward_through_the_cli(reward, chorus, home):
    args, cases = CASES[reward]
    rows = home / f"{reward}.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "q", **row}) + "\n" for row, _ in cases))
    rows.chmod(0o644)
    done = chorus(["reward", "score", reward, str(rows), "--args", json.dumps(args), "--timeout", "60"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [o.get("failed") for o in out] == [None] * len(cases), done.stderr[-3000:]
    assert [round(o["score"], 6) for o in out] == [want for _, want in cases], done.stderr[-3000:]


def test_similarity_through_the_cli(chorus, home):
    rows = home / "similarity.jsonl"
    cases = [{"response": "The cat sat on the mat.", "answer": "The cat sat on the mat."},
             {"response": "Quarterly revenue grew by four percent.", "answer": "The cat sat on the mat."},
             {"response": "\N{PILE OF POO}" * 1000 + "\n" * 50_000, "answer": "The cat sat on the mat."}]
    rows.write_text("".join(json.dumps({"prompt": "q", **row}) + "\n" for row in cases))
    rows.chmod(0o644)
    done = chorus(["reward", "score", "similarity", str(rows), "--timeout", "120"])
    assert done.returncode == 0, done.stderr[-3000:]
    same, unrelated, hostile = (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    assert same["score"] == pytest.approx(1.0, abs=1e-5) and unrelated["score"] < 0.3, (same, unrelated)
    assert "failed" not in hostile and hostile["score"] < 0.3, hostile


def test_no_sandbox_is_a_counted_failure_not_a_zero(home):
    """Without `unshare` nothing untrusted runs, and the rows fail (counted: `failed` in the CLI's output)."""
    rows = home / "code_no_sandbox.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "response": "print(4)", "tests": IO_TESTS}) + "\n")
    done = subprocess.run([sys.executable, "-m", "actors.cli", "reward", "score", "code_exec", str(rows)], cwd=ROOT,
                          capture_output=True, text=True, timeout=200, env={"PATH": "/nonexistent", "HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert out["failed"] == ["code_exec"] and "unshare" in done.stderr, (out, done.stderr[-2000:])
