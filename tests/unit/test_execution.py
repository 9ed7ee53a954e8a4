"""code_exec and sql_exec on real inputs, honest and hostile, each run in the real sandbox."""

from __future__ import annotations

import subprocess
import time
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


# Programs that got full marks for a wrong answer when the harness decided in the model's own process. Each reads
# what it needs from the harness (its frame, its module) as model code can.
FORGERS = {
    "prints the old verdict with the harness's own nonce, then exits":
        "import sys, json, os\nh = sys._getframe(1).f_globals\n"
        "os.write(h['out'].fileno(), (json.dumps({'nonce': h['nonce'], 'passed': [True] * 3, 'error': ''}) + "
        "'\\n').encode())\nos._exit(0)",
    "reports values of its choosing for every test through the harness's emit":
        "import sys, os\nh = sys._getframe(1).f_globals\n"
        "for i in range(3): h['emit']({'test': i, 'values': [['b', True]], 'error': ''})\nos._exit(0)",
    "returns an object equal to everything":
        "class Any:\n    def __eq__(self, other): return True\ndef add(a, b): return Any()",
    "returns an int subclass equal to everything":
        "class I(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
        "def add(a, b): return I(-7)",
    "makes AssertionError unraisable and exec a no-op":
        "import builtins\nbuiltins.AssertionError = type('Never', (Exception,), {})\n"
        "builtins.exec = lambda *a, **k: None\ndef add(a, b): return -7",
    "patches json.dumps to print a passing line":
        "import json, sys\nh = sys._getframe(1).f_globals\nreal = json.dumps\n"
        "json.dumps = lambda obj, **k: real({**obj, 'error': '', 'values': []} if 'test' in obj else obj)\n"
        "def add(a, b): return -7",
    "hooks sys.settrace to skip every test":
        "import sys\nsys.settrace(lambda *a: None)\nsys.setprofile(lambda f, e, a: (_ for _ in ()).throw(SystemExit) "
        "if e == 'call' and f.f_code.co_filename == 'test' else None)\ndef add(a, b): return -7",
}


def test_an_expected_value_bound_in_the_tests_never_enters_the_sandbox():
    tests = ["expected = [1, 2, 3]", "assert f([3, 1, 2]) == expected", "data = [5, 4]", "assert f(data) == [4, 5]"]
    assert score("def f(xs): return sorted(xs)", tests) == 1.0
    # the solution's globals are the tests' namespace: it finds data (an input it is given) but not expected
    assert score("def f(xs): return globals().get('expected', sorted(xs)[::-1])", tests) == 0.0


@pytest.mark.parametrize("how", list(FORGERS))
def test_a_wrong_program_cannot_forge_its_verdict(how):
    assert score(FORGERS[how]) == 0.0, how


def test_changing_what_the_harness_sends_back_is_no_better_than_a_wrong_function():
    # every value it sends becomes 3: the score of `def add(a, b): return 3`, i.e. only add(1, 2) == 3 passes
    patched = "import sys\nsys._getframe(1).f_globals['encode'] = lambda v, d=0: ['i', '3']\ndef add(a, b): return 0"
    assert score(patched) == pytest.approx(1 / 3)
    assert score("def add(a, b): return 3") == pytest.approx(1 / 3)


def test_assert_tests_read_like_python():
    tests = ["import math", "expected = [1, 2, 3]", "assert f([3, 1, 2]) == expected",
             "assert math.isclose(g(2), 1.4142, rel_tol=1e-3) and not g(-1)", "s = Stack()\ns.push(4)\n"
             "assert s.pop() == 4 and len(s.items) == 0", "assert isinstance(f([]), list) and f([]) == []"]
    good = ("def f(xs): return sorted(xs)\ndef g(x): return x ** 0.5 if x > 0 else 0\n"
            "class Stack:\n    def __init__(self): self.items = []\n    def push(self, x): self.items.append(x)\n"
            "    def pop(self): return self.items.pop()")
    assert score(good, tests) == 1.0
    wrong = good.replace("sorted(xs)", "list(xs)").replace("self.items.pop()", "self.items[-1]")
    assert score(wrong, tests) == pytest.approx(2 / 4)  # the sort and the stack fail; setup lines are not tests
    # an assert inside a loop could only be decided in the model's process: the row is not scored
    assert score(good, ["for x in [1, 2]:\n    assert f([x]) == [x]"]) is None


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


def test_sql_query_cannot_write_attach_or_lift_read_only():
    assert sql("PRAGMA query_only = OFF") == 0.0
    assert sql("ATTACH DATABASE '/sandbox/x.db' AS x") == 0.0
    assert sql("UPDATE emp SET salary = 0 RETURNING dept, salary") == 0.0
    assert sql("SELECT dept, AVG(salary) FROM emp GROUP BY dept") == 1.0


def test_hostile_rows_fail_alone_and_fast():
    """A batch mixing hostile and honest rows: each honest row keeps its exact score."""
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    rows = [("`" * 80_000, ADD_TESTS), (good, ADD_TESTS), ("```python\n" + "(" * 100_000, ADD_TESTS),
            ("def add(a, b):\n    return a + b if a > 0 else -1", ADD_TESTS), ("```\n" * 40_000, ADD_TESTS),
            (good.replace("b\n", "b  # \ud800\n"), ADD_TESTS), ("import os\nwhile True: os.fork()", ADD_TESTS),
            ("def add(a, b): return 10 ** 100_000", ADD_TESTS)]
    start = time.monotonic()
    scores = code_exec([""] * len(rows), [r for r, _ in rows], tests=[t for _, t in rows], timeout_s=5, workers=2)
    assert time.monotonic() - start < 40
    assert scores[1] == 1.0 and scores[3] == pytest.approx(2 / 3) and scores[5] == 1.0, scores
    assert [scores[i] for i in (0, 2, 4, 6, 7)] == [0.0] * 5, scores


def test_extract_code_is_linear_on_a_response_of_backticks():
    start = time.monotonic()
    for text in ("`" * 80_000, "```\n" * 40_000, "```python " * 20_000, "x```\n" * 30_000):
        extract_code(text, "python")
    assert time.monotonic() - start < 1.0


def test_a_comparison_cannot_be_handed_to_a_helper_the_model_can_replace():
    tests = ["from math import isclose", "assert isclose(area(1), 3.14159, rel_tol=1e-3)"]
    assert score("def area(r): return 3.14159 * r * r", tests) == 1.0
    forger = "import math, builtins\nmath.isclose = lambda *a, **k: True\ndef area(r): return 0"
    assert score(forger, tests) == 0.0  # the host's isclose decides
    # a helper of the tests' own given the model's output and the expected value: not checkable, not scored
    assert score("def area(r): return 3.14159 * r * r",
                 ["import numpy as np", "assert np.allclose(area(1), 3.14159)"]) is None
    assert score("def area(r): return 3.14159 * r * r",
                 ["def close(a, b): return abs(a - b) < 1e-3", "assert close(area(1), 3.14159)"]) is None


def test_expected_values_the_tests_compute_are_computed_without_the_solution():
    tests = ["assert f(3) == [i * i for i in range(3)]", "assert g('ab') == 'AB'.lower()",
             "assert f(6000) is not None and h(6000) % 1000 == pow(7, 6000, 1000)"]
    good = "def f(n): return [i * i for i in range(n)]\ndef g(s): return s\ndef h(n): return 7 ** n"
    assert score(good, tests) == 1.0
    # reads the plan the harness was given and answers each part with what it evaluates to: the expected sides
    # are not in it, so it can only answer the calls, which is what implementing f, g and h means
    forger = ("import json, sys\nplan = json.load(open('plan.json'))\n"
              "h = sys.modules['__main__'].__dict__\n"
              "for i, steps in enumerate(plan):\n"
              "    h['emit']({'test': i, 'values': [h['encode']([0, 1, 4]) for _ in steps], 'error': ''})\n"
              "import os\nos._exit(0)")
    assert score(forger, tests) == pytest.approx(1 / 3)  # as `def f(n): return [0, 1, 4]` would score


def test_honest_programs_score_what_python_would_say():
    cases = [  # (solution, test): each passes under plain Python
        ("def srt(xs): xs.sort()", ["lst = [3, 1, 2]", "srt(lst)", "assert lst == [1, 2, 3]"]),
        ("def add(d): d['k'] = 1", ["d = {}", "add(d)", "assert d == {'k': 1}"]),
        ("from collections import Counter\ndef count(s): return Counter(s)",
         ["assert count('aab') == {'a': 2, 'b': 1}"]),
        ("from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef p(): return P(1, 2)",
         ["assert p() == (1, 2)"]),
        ("import numpy as np\ndef s(xs): return np.sum(xs)", ["assert s([1, 2, 3]) == 6"]),
        ("def evens(xs): return filter(lambda x: x % 2 == 0, xs)", ["assert list(evens([1, 2, 4])) == [2, 4]"]),
        ("def keys(d): return d.keys()", ["assert sorted(keys({'b': 1, 'a': 2})) == ['a', 'b']"]),
        ("def words(): return ['bb', 'a', 'ccc']", ["assert sorted(words(), key=len) == ['a', 'bb', 'ccc']",
                                                    "assert max([-5, 2], key=abs) == -5"]),
        ("def f(n): return 7 ** n", ["assert f(6000) % 1000 == pow(7, 6000, 1000)"]),
        ("def f(xs): return xs", ["assert f([]) == [] or f([])[0].upper() == 'A'"]),
        ("def f(n): return list(range(n))",  # the expected side reads n as it is at each assert
         ["n = 3", "assert f(n) == [i for i in range(n)]", "n = 4", "assert f(n) == [i for i in range(n)]"]),
    ]
    for solution, tests in cases:
        assert score(solution, tests) == 1.0, (solution, tests)


def test_a_set_of_colliding_hashes_is_refused_fast():
    from rewards.checks import decode_all

    start = time.monotonic()
    assert decode_all([["S", [["i", hex(k * (2 ** 61 - 1))] for k in range(30_000)]]]) is None
    assert time.monotonic() - start < 1.0
    assert decode_all([["S", [["i", hex(k)] for k in range(30_000)]]]) == [set(range(30_000))]


def test_stdin_stdout_tests_share_the_rows_time():
    tests = [{"input": "", "output": "x"}] * 8
    start = time.monotonic()
    assert score("import time\ntime.sleep(100)", tests, timeout_s=1) == 0.0
    assert time.monotonic() - start < 5  # the first times out, the rest are not run


def test_malformed_tests_are_the_rows_fault():
    assert score("print(1)", "not json") is None
    assert score("print(1)", [{"output": "1"}]) is None
    assert score("x = 1", ["x = 2"]) is None  # no assert at all: nothing to check


def test_sql_order_and_types_as_sqlite_means_them():
    ordered = "SELECT name FROM emp ORDER\nBY salary"
    assert sql("SELECT name FROM emp ORDER BY salary DESC", ordered) == 0.0
    window = "SELECT name, ROW_NUMBER() OVER (ORDER BY salary) FROM emp"
    assert sql("SELECT name, ROW_NUMBER() OVER (ORDER BY salary) FROM emp ORDER BY name DESC", window) == 1.0
    assert sql("SELECT 'abcd'", "SELECT x'abcd'") == 0.0
