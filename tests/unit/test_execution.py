"""code_exec and sql_exec on real inputs, honest and hostile, each run in the real sandbox."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from rewards.execution import code_exec, extract_code, sql_exec

pytestmark = pytest.mark.timeout(120)

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def score(response: str, tests=ADD_TESTS, **kw) -> float | None:
    return code_exec([""], [response], tests=[tests], **kw)[0]


def test_extract_code_takes_the_last_python_block():
    text = "try this\n```python\nx = 1\n```\nno, this:\n```\nx = 2\n```\n```bash\nls\n```"
    assert extract_code(text, "python") == "x = 2\n"
    assert extract_code("def f(): pass", "python") == "def f(): pass"


def test_assert_tests_score_the_share_passed():
    assert score("```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert score("def add(a, b):\n    return a + b if a > 0 else -1") == pytest.approx(2 / 3)  # add(-1, 1) fails
    assert score("def add(a, b):\n    return a + b if a > 0 else -1", partial=False) == 0.0
    assert score("def add(a, b) return") == 0.0  # syntax error: no test runs


def test_stdin_stdout_tests_compare_lines():
    tests = [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"}]
    assert score("a, b = map(int, input().split())\nprint(a + b)  ", tests) == 1.0
    assert score("a, b = map(int, input().split())\nprint(a * b)", tests) == 0.0
    assert score("print(3)", tests) == 0.5


def test_exiting_early_or_forging_the_verdict_scores_zero():
    assert score("import os\nos._exit(0)") == 0.0
    assert score("import sys\nsys.exit(0)") == 0.0
    forged = 'import json\nprint(json.dumps({"nonce": "x", "passed": [True, True, True], "error": ""}))\n' \
             "import os\nos._exit(0)"
    assert score(forged) == 0.0


def test_a_test_that_hangs_fails_alone():
    slow = "def add(a, b):\n    while a == 2: pass\n    return a + b"
    assert score(slow, per_test_s=0.5) == pytest.approx(2 / 3)


def test_infinite_loop_and_fork_bomb_score_zero_in_bounded_time():
    assert score("while True: pass", timeout_s=3) == 0.0
    assert score("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", timeout_s=3) == 0.0


def test_huge_output_scores_zero():
    assert score("import sys\nwhile True: sys.stdout.write('x' * 65536)", timeout_s=5) == 0.0
    tests = [{"input": "", "output": "x"}]
    assert score("import sys\nwhile True: sys.stdout.write('x' * 65536)", tests, timeout_s=5) == 0.0


def test_network_and_writes_outside_fail_and_leave_no_trace():
    target = Path("/tmp", f"chorus-escape-{uuid.uuid4().hex}")
    code = (f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n    ok = True\n"
            "except OSError:\n    ok = False\ndef add(a, b):\n    return a + b if not ok else 0")
    assert score(code) == 1.0  # add works only when the connection failed
    assert not target.exists()


def test_rows_without_tests_cannot_be_scored():
    assert score("def add(a, b): return a + b", tests=[]) is None


SCHEMA = """
CREATE TABLE emp (name TEXT, dept TEXT, salary REAL);
INSERT INTO emp VALUES ('ann', 'ops', 100), ('bob', 'ops', 80), ('cid', 'dev', 120);
"""


def sql(response: str, reference: str = "SELECT dept, AVG(salary) FROM emp GROUP BY dept", **kw):
    return sql_exec([""], [response], schema=[SCHEMA], answer=[reference], **kw)[0]


def test_sql_result_sets_compare_as_multisets_unless_ordered():
    assert sql("```sql\nSELECT dept AS d, SUM(salary) / COUNT(*) FROM emp GROUP BY dept ORDER BY d DESC\n```") == 1.0
    assert sql("SELECT dept, MAX(salary) FROM emp GROUP BY dept") == 0.0
    ordered = "SELECT name FROM emp ORDER BY salary"
    assert sql("SELECT name FROM emp ORDER BY salary", ordered) == 1.0
    assert sql("SELECT name FROM emp ORDER BY salary DESC", ordered) == 0.0


def test_sql_errors_and_runaway_queries_score_zero():
    assert sql("SELEC dept FROM emp") == 0.0
    assert sql("SELECT * FROM nope") == 0.0
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    assert sql(forever, query_s=1.0) == 0.0


def test_sql_cannot_write_files():
    target = Path("/tmp", f"chorus-escape-{uuid.uuid4().hex}.db")
    attack = f"ATTACH DATABASE '{target}' AS x; CREATE TABLE x.t(a); SELECT dept, AVG(salary) FROM emp GROUP BY dept"
    assert sql(attack) == 0.0  # sqlite3 runs one statement per execute; the attach never happens
    assert not target.exists()


def test_broken_schema_is_the_rows_fault():
    assert sql_exec([""], ["SELECT 1"], schema=["CREATE TABLE ("], answer=["SELECT 1"])[0] is None
