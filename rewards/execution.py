"""Rewards checked by running the model's answer: ``code_exec`` (Python against tests) and ``sql_exec`` (a query
against an in-memory SQLite database, compared with the reference query's result set).

Both run every model-written program in ``rewards.sandbox`` (no network, read-only file system, CPU, memory and
wall-clock limits, the whole process tree killed afterwards). What crosses back is one JSON line, never pickle.
A score of 0.0 means the model's answer failed; ``None`` (the reward's failure, counted and given the configured
fallback) means the sandbox itself could not run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from rewards.registry import register
from rewards.sandbox import Limits, run

log = logging.getLogger("chorus.rewards")

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str, language: str) -> str:
    """The last fenced block tagged ``language`` (or untagged) in ``response``; the whole response if it has none.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\ndone", "python")
    'print(1)\\n'
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    tagged = [body for tag, body in blocks if tag in (language, "")]
    return tagged[-1] if tagged else response


def _pool_map(fn, items: list, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(pool.map(fn, items))


def _run_harness(harness: str, arg, files: dict[str, str], limits: Limits):
    """Run ``harness`` (one of the scripts below) in the sandbox with ``arg`` and ``files`` beside it. It reads a
    fresh nonce from stdin before any model-written text is touched; returns the sandbox result and the harness's
    verdicts: the JSON objects on stdout that carry that nonce, in order."""
    nonce = os.urandom(16).hex()
    result = run([sys.executable, "-I", "harness.py", str(arg)], stdin=f"{nonce}\n".encode(), limits=limits,
                 files={"harness.py": harness, **files})
    verdicts = []
    for line in result.stdout.decode(errors="replace").splitlines():
        if nonce in line:
            try:
                verdict = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(verdict, dict) and verdict.get("nonce") == nonce:
                verdicts.append(verdict)
    return result, verdicts


# The test harness, run inside the sandbox: read the nonce before the model's code runs, run the solution once,
# then each test under its own alarm; print the verdict last. A solution that exits early, crashes the
# interpreter or floods the output leaves no verdict line, which scores 0.
_PY_HARNESS = r'''
import json, os, signal, sys
nonce = sys.stdin.readline().strip()
sys.stdin = open(os.devnull)
tests, per_test_s = json.load(open("tests.json")), float(sys.argv[1])
def alarm(*_):
    raise TimeoutError("test timed out")
signal.signal(signal.SIGALRM, alarm)
real_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
ns = {"__name__": "solution"}
passed, error = [], ""
try:
    signal.setitimer(signal.ITIMER_REAL, per_test_s)
    exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException as exc:
    signal.setitimer(signal.ITIMER_REAL, 0)
    error = f"solution: {type(exc).__name__}: {exc}"[:300]
for test in tests if not error else []:
    try:
        signal.setitimer(signal.ITIMER_REAL, per_test_s)
        exec(compile(test, "test", "exec"), ns)
        passed.append(True)
    except BaseException:
        passed.append(False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
sys.stdout = real_stdout
print(json.dumps({"nonce": nonce, "passed": passed, "error": error}), flush=True)
'''


def _normalise_output(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


@register("code_exec")
def code_exec(prompts: list[str], responses: list[str], tests: list, *, timeout_s: float = 10.0,
              per_test_s: float = 2.0, cpu_s: int = 5, memory_mb: int = 1024, partial: bool = True,
              workers: int = 4, **_) -> list[float | None]:
    """Python code from the response (its last fenced block, or all of it) against the row's ``tests``.

    ``tests`` is either a list of Python statements (``"assert add(1, 2) == 3"``), run after the solution in the
    same namespace, each under ``per_test_s``; or a list of ``{"input": ..., "output": ...}`` pairs, each a
    separate run of the program with that stdin, compared line by line with trailing spaces ignored. The score is
    the share of tests passed (``partial: false``: 1.0 only if all pass).
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)

    def one(item) -> float | None:
        response, row_tests = item
        if isinstance(row_tests, str):
            row_tests = json.loads(row_tests)
        if not row_tests:
            return None  # nothing to check against: the row's fault, not the model's
        code = extract_code(response, "python")
        if all(isinstance(t, dict) for t in row_tests):
            results = [run([sys.executable, "-I", "solution.py"], files={"solution.py": code},
                           stdin=str(t["input"]).encode(), limits=limits) for t in row_tests]
            if any(r.error for r in results):
                return None
            passed = [r.ok and _normalise_output(r.stdout.decode(errors="replace"))
                      == _normalise_output(str(t["output"])) for r, t in zip(results, row_tests)]
        else:
            result, verdicts = _run_harness(_PY_HARNESS, per_test_s, limits=limits,
                                            files={"solution.py": code, "tests.json": json.dumps(row_tests)})
            if result.error:
                return None
            passed = verdicts[-1]["passed"] if verdicts and len(verdicts[-1]["passed"]) == len(row_tests) else []
        share = sum(passed) / len(row_tests)
        return share if partial else float(share == 1.0)

    return _pool_map(one, list(zip(responses, tests)), workers)


# The SQL harness: build the database from the row's schema script, run the reference query and the model's, print
# both result sets as JSON. A progress handler stops a runaway query (a recursive CTE without end) in SQLite itself.
_SQL_HARNESS = r'''
import json, sqlite3, sys, time
nonce = sys.stdin.readline().strip()
schema, reference, query = (open(name).read() for name in ("schema.sql", "reference.sql", "query.sql"))
budget_s = float(sys.argv[1])
def plain(v):
    return v.hex() if isinstance(v, bytes) else v
def rows(db, sql):
    deadline = time.monotonic() + budget_s
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10000)
    cur = db.execute(sql)
    return [[plain(v) for v in row] for row in cur.fetchmany(10001)]
try:
    db = sqlite3.connect(":memory:")
    db.executescript(schema)
    out = {"nonce": nonce, "reference": rows(db, reference), "ordered": "order by" in reference.lower()}
except Exception as exc:
    print(json.dumps({"nonce": nonce, "row_error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
    sys.exit(0)
try:
    out["rows"] = rows(db, query)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(out), flush=True)
'''


def _same_result(got: list, want: list, ordered: bool) -> bool:
    """Result sets are equal as lists (the reference orders its rows) or as multisets; numbers compare with a
    tolerance of 1e-6 so that ``AVG`` computed two ways still matches."""
    def key(row):
        return [round(v, 6) if isinstance(v, float) else v for v in row]

    got, want = [key(r) for r in got], [key(r) for r in want]
    if not ordered:
        got, want = sorted(got, key=repr), sorted(want, key=repr)
    return got == want


@register("sql_exec")
def sql_exec(prompts: list[str], responses: list[str], schema: list[str], answer: list[str], *,
             timeout_s: float = 10.0, query_s: float = 3.0, workers: int = 4, **_) -> list[float | None]:
    """1.0 where the response's SQL (its last ```sql block, or all of it) returns the same result set as the
    row's reference query ``answer`` on an in-memory SQLite database built by the row's ``schema`` script
    (``CREATE TABLE`` and ``INSERT`` statements); 0.0 otherwise, including a query that errors or runs past
    ``query_s``. Row order matters only when the reference has ``ORDER BY``; column names never do.
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=int(timeout_s))

    def one(item) -> float | None:
        response, row_schema, reference = item
        result, verdicts = _run_harness(_SQL_HARNESS, query_s, limits=limits, files={
            "schema.sql": row_schema, "reference.sql": reference, "query.sql": extract_code(response, "sql")})
        if result.error:
            return None
        if not verdicts:  # the model's query took the harness down (or past the wall clock)
            return 0.0
        verdict = verdicts[-1]
        if "row_error" in verdict:  # the row's own schema or reference query fails: not the model's fault
            log.warning("sql_exec: the row's schema or reference query fails: %s", verdict["row_error"])
            return None
        if "rows" not in verdict:
            return 0.0
        return float(_same_result(verdict["rows"], verdict["reference"], verdict["ordered"]))

    return _pool_map(one, list(zip(responses, schema, answer)), workers)


# The math checker, run inside the sandbox because it hands model text to SymPy's parser (which evaluates what it
# parses). One verdict line per item as soon as it is known, so that an answer that hangs the checker costs only
# itself: the host scores it 0 and checks the rest in a fresh sandbox.
_MATH_HARNESS = r'''
import json, sys, warnings
warnings.filterwarnings("ignore")
nonce = sys.stdin.readline().strip()
per_item_s = int(sys.argv[1])
import logging
logging.disable(logging.WARNING)
from math_verify import parse, verify
for i, (gold, response) in enumerate(json.load(open("items.json"))):
    try:
        target = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=per_item_s)
        ok = bool(target) and verify(target, parse(response, parsing_timeout=per_item_s), timeout_seconds=per_item_s)
    except BaseException:
        ok = False
    print(json.dumps({"nonce": nonce, "i": i, "ok": bool(ok)}), flush=True)
'''

MAX_MATH_CHARS = 10_000  # the end of a longer response is checked: that is where the final answer is


@register("math")
def math_answer(prompts: list[str], responses: list[str], answer: list[str], *, per_item_s: int = 5,
                timeout_s: float = 60.0, memory_mb: int = 2048, **_) -> list[float | None]:
    """1.0 where the response's final answer (its last ``\\boxed{}``, else its last number or expression) is
    mathematically equal to the row's ``answer`` (LaTeX or plain: ``\\frac{1}{2}`` matches ``0.5``, ``(x+1)^2``
    matches ``x^2+2x+1``), by Hugging Face's math-verify; else 0.0. It runs in the sandbox, each item under
    ``per_item_s``; an answer that hangs the checker scores 0.0 and costs no other item its score.
    """
    scores: list[float | None] = [None] * len(responses)
    todo = list(range(len(responses)))
    limits = Limits(timeout_s=timeout_s, cpu_s=int(timeout_s), memory_mb=memory_mb)
    while todo:
        items = [[str(answer[i]), responses[i][-MAX_MATH_CHARS:]] for i in todo]
        result, verdicts = _run_harness(_MATH_HARNESS, per_item_s, {"items.json": json.dumps(items)}, limits)
        if result.error:
            break  # the sandbox cannot run: the rest stay None (counted failures)
        done = 0
        for verdict in verdicts:
            if verdict.get("i") == done:
                scores[todo[done]] = float(verdict["ok"] is True)
                done += 1
        if done < len(todo):
            if done == 0 and not (result.timed_out or result.returncode not in (0, None)):
                break  # the checker itself fails to start: leave the rest to the fallback
            scores[todo[done]] = 0.0  # this answer hung or crashed the checker
            done += 1
        todo = todo[done:]
    return scores
