"""Rewards checked by running the model's answer: ``code_exec`` (Python against tests) and ``sql_exec`` (a query
against an in-memory SQLite database, compared with the reference query's result set).

Both run every model-written program in ``rewards.sandbox`` (no network, read-only file system, CPU, memory and
wall-clock limits, the whole process tree killed afterwards). What crosses back is one JSON line, never pickle.
A score of 0.0 means the model's answer failed; ``None`` (the reward's failure, counted and given the configured
fallback) means the sandbox itself could not run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rewards import checks
from rewards.checks import ENCODER
from rewards.registry import register
from rewards.sandbox import Limits, SandboxUnavailable, run

log = logging.getLogger("chorus.rewards")

def extract_code(response: str, language: str) -> str:
    """The last fenced block tagged ``language`` (or untagged) in ``response``; the whole response if it has none.
    A fence is a line that starts with three backticks; one scan over the lines (no regex that backtracks on a
    response full of backticks).

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\ndone", "python")
    'print(1)\\n'
    """
    found, block, tag = None, None, ""
    for line in response.splitlines(keepends=True):
        if line.lstrip(" \t").startswith("```"):
            if block is None:  # an opening fence: its tag is the first word after the backticks
                words = line.lstrip(" \t")[3:].split(maxsplit=1)
                tag, block = (words[0].lower() if words else ""), []
            else:
                if tag in (language, ""):
                    found = "".join(block)
                block = None
        elif block is not None:
            block.append(line)
    return response if found is None else found


def _pool_map(fn, items: list, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(pool.map(fn, items))


class _HarnessFailed(RuntimeError):
    """The sandbox or the harness did not start: the reward's failure, not the model's."""


def _run_harness(harness: str, arg, files: dict[str, str], limits: Limits) -> list[dict]:
    """Run ``harness`` (one of the scripts below) in the sandbox with ``arg`` and ``files`` beside it. It reads a
    fresh nonce from stdin and prints ``{"nonce": ..., "started": true}`` before any model-written text is touched;
    returns the JSON objects on stdout after that line that carry the nonce, in order. Raises
    :class:`_HarnessFailed` when the sandbox failed (or is unavailable) or the harness never started."""
    nonce = os.urandom(16).hex()
    try:
        result = run([sys.executable, "-I", "harness.py", str(arg)], stdin=f"{nonce}\n".encode(), limits=limits,
                     files={"harness.py": harness, **files})
    except SandboxUnavailable as exc:
        raise _HarnessFailed(str(exc)) from None
    if result.error:
        raise _HarnessFailed(result.error)
    messages = []
    for line in result.stdout.decode(errors="replace").splitlines():
        if nonce in line:
            try:
                message = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(message, dict) and message.get("nonce") == nonce:
                messages.append(message)
    if not messages or messages[0].get("started") is not True:
        stderr = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise _HarnessFailed(f"the harness did not start (exit {result.returncode}): {stderr[0][:300]}")
    return messages[1:]


# The test harness, run inside the sandbox. It is not trusted with the verdict: it runs the solution, then each
# test's statements in order, and sends back the values of the parts of each assert that need the model's code
# (rewards/checks.py); the host compares them with what the tests expect, which never enters the sandbox.
_PY_HARNESS = r"""
import json, os, signal, sys
nonce = sys.stdin.readline().strip()
sys.stdin = open(os.devnull)
plan, per_test_s = json.load(open("plan.json")), float(sys.argv[1])
out = os.fdopen(os.dup(1), "w")
def emit(message):
    out.write(json.dumps({"nonce": nonce, **message}) + "\n")
    out.flush()
emit({"started": True})
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the model's code prints goes nowhere
sys.stdout = open(os.devnull, "w")
%s
def alarm(*_):
    raise TimeoutError("test timed out")
signal.signal(signal.SIGALRM, alarm)
ns = {"__name__": "solution"}
try:
    signal.setitimer(signal.ITIMER_REAL, per_test_s)
    exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException as exc:
    signal.setitimer(signal.ITIMER_REAL, 0)
    emit({"error": f"solution: {type(exc).__name__}: {exc}"[:300]})
    sys.exit(0)
for i, steps in enumerate(plan):
    values, error = [], ""
    try:
        signal.setitimer(signal.ITIMER_REAL, per_test_s)
        for kind, source in steps:
            if kind == "exec":
                exec(compile(source, "test", "exec"), ns)
                continue
            try:  # a part that raises is the host's to judge: `x == [] or x[0] == 1` never reaches x[0]
                values.append(encode(eval(compile(source, "test", "eval"), ns)))
            except Exception as exc:
                values.append(["!", type(exc).__name__])
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    emit({"test": i, "values": values, "error": error})
""" % ENCODER


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

    Every verdict is reached outside the model's process: its stdout for the pairs, the values of the calls of
    each ``assert`` for the statements (``rewards/checks.py``: the expected values never enter the sandbox). A
    test with an ``assert`` nested in a loop or a function cannot be checked that way: its row scores None (the
    reward's failure, counted), as does a row whose sandbox could not run.
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)

    def one(item) -> float | None:
        response, row_tests = item
        code = extract_code(response, "python")
        try:
            if isinstance(row_tests, str):
                row_tests = json.loads(row_tests)
            if not isinstance(row_tests, list) or not row_tests:
                raise ValueError(f"tests must be a non-empty list, got {type(row_tests).__name__}")
            if all(isinstance(t, dict) for t in row_tests):
                passed = _io_tests(code, row_tests, limits)
            else:
                passed = _assert_tests(code, [str(t) for t in row_tests], per_test_s, limits)
        except (checks.Uncheckable, SyntaxError, ValueError, KeyError, _HarnessFailed, SandboxUnavailable) as exc:
            log.warning("code_exec: row not scored: %s", exc)  # the row's fault or the sandbox's, not the model's
            return None
        share = sum(passed) / len(passed)
        return share if partial else float(share == 1.0)

    return _pool_map(one, list(zip(responses, tests)), workers)


def _io_tests(code: str, tests: list[dict], limits: Limits) -> list[bool]:
    """One run per stdin/stdout pair, all within the row's ``timeout_s``: after a run that times out, or once the
    row's time is spent, the rest fail without running."""
    if not all("input" in t and "output" in t for t in tests):
        raise ValueError("every stdin/stdout test needs an 'input' and an 'output'")
    deadline, passed = time.monotonic() + limits.timeout_s, []
    for t in tests:
        left = deadline - time.monotonic()
        if left <= 0.05 or (passed and passed[-1] is None):
            passed.append(None)
            continue
        r = run([sys.executable, "-I", "solution.py"], files={"solution.py": code}, stdin=str(t["input"]).encode(),
                limits=dataclasses.replace(limits, timeout_s=left))
        if r.error:
            raise _HarnessFailed(r.error)
        same = _normalise_output(r.stdout.decode(errors="replace")) == _normalise_output(str(t["output"]))
        passed.append(None if r.timed_out else r.ok and same)
    return [p is True for p in passed]


def _assert_tests(code: str, tests: list[str], per_test_s: float, limits: Limits) -> list[bool]:
    """Per test that checks something (a test of setup statements alone is not counted), whether it passed."""
    p = checks.plan(tests)
    if not any(p.checks):
        raise ValueError("no test has an assert")
    model = _reports(_run_harness(_PY_HARNESS, per_test_s, limits=limits,
                                  files={"solution.py": code, "plan.json": json.dumps(p.steps)}))
    reference = {}
    if p.reference:  # the expected values the tests compute: Python's, without the solution
        reference = _reports(_run_harness(_PY_HARNESS, per_test_s * len(p.reference), limits=limits,
                                          files={"solution.py": "", "plan.json": json.dumps([p.reference])}))
    ref_values = checks.decode_all(reference.get(0, {}).get("values", []))
    passed = []
    for i, (test_steps, test_checks) in enumerate(zip(p.steps, p.checks)):
        message = model.get(i, {})
        values = checks.decode_all(message.get("values"))
        ok = (message.get("error") == "" and values is not None and ref_values is not None
              and len(values) == sum(kind == "eval" for kind, _ in test_steps))
        if test_checks:
            passed.append(ok and all(checks.holds(c, values, ref_values) for c in test_checks))
    return passed


def _reports(messages: list[dict]) -> dict[int, dict]:
    """The first report of each test; the model's own lines can only add values its code could have returned."""
    reported = {}
    for message in messages:
        if isinstance(message.get("test"), int) and message["test"] not in reported:
            reported[message["test"]] = message
    return reported


# The SQL harness: build the database from the row's schema script, run the reference query, then the model's on a
# read-only connection that may not attach files or change pragmas; print both result sets as JSON. A progress
# handler stops a runaway query (a recursive CTE without end) in SQLite itself. SQL cannot run Python: the harness
# stays honest, and the host compares the two sets.
_SQL_HARNESS = r"""
import json, sqlite3, sys, time
nonce = sys.stdin.readline().strip()
def emit(message):
    print(json.dumps({"nonce": nonce, **message}), flush=True)
emit({"started": True})
schema, reference, query = (open(name).read() for name in ("schema.sql", "reference.sql", "query.sql"))
budget_s = float(sys.argv[1])
def plain(v):
    return {"blob": v.hex()} if isinstance(v, bytes) else v
def rows(db, sql):
    deadline = time.monotonic() + budget_s
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10000)
    cur = db.execute(sql)
    return [[plain(v) for v in row] for row in cur.fetchmany(10001)]
DENIED = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA}
try:
    db = sqlite3.connect(":memory:")
    db.executescript(schema)
    out = {"reference": rows(db, reference)}
except Exception as exc:
    emit({"row_error": f"{type(exc).__name__}: {exc}"[:300]})
    sys.exit(0)
try:
    db.execute("PRAGMA query_only = ON")
    db.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in DENIED else sqlite3.SQLITE_OK)
    out["rows"] = rows(db, query)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"[:300]
emit(out)
"""


def _ordered(sql: str) -> bool:
    """Whether a query orders its result: an ORDER BY outside every parenthesis (not a window's or a subquery's),
    strings and comments aside."""
    depth, i, text = 0, 0, sql.lower()
    while i < len(text):
        c = text[i]
        if c in "'\"`[":  # a quoted string or name: skip to its end
            end = text.find("]" if c == "[" else c, i + 1)
            i = len(text) if end < 0 else end + 1
            continue
        if text.startswith(("--", "/*"), i):  # a comment: skip to its end
            end = text.find("\n" if c == "-" else "*/", i + 2)
            i = len(text) if end < 0 else end + 2
            continue
        depth += (c == "(") - (c == ")")
        word_start = i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")
        if depth == 0 and word_start and text.startswith("order", i):
            rest = text[i + 5:]
            if rest[:1].isspace() and rest.lstrip().startswith("by") and not rest.lstrip()[2:3].isalnum():
                return True
        i += 1
    return False


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
    (``CREATE TABLE`` and ``INSERT`` statements); 0.0 otherwise, including a query that errors, writes, attaches a
    file or runs past ``query_s``. Row order matters only when the reference has ``ORDER BY``; column names never
    do. None (the reward's failure) when the row's own schema or reference fails, or the sandbox cannot run.
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)))

    def one(item) -> float | None:
        response, row_schema, reference = item
        try:
            verdicts = _run_harness(_SQL_HARNESS, query_s, limits=limits, files={
                "schema.sql": row_schema, "reference.sql": reference, "query.sql": extract_code(response, "sql")})
        except _HarnessFailed as exc:
            log.warning("sql_exec: row not scored: %s", exc)
            return None
        if not verdicts:  # the model's query took the harness down (or past the wall clock)
            return 0.0
        verdict = verdicts[-1]
        if "row_error" in verdict:  # the row's own schema or reference query fails: not the model's fault
            log.warning("sql_exec: the row's schema or reference query fails: %s", verdict["row_error"])
            return None
        if not isinstance(verdict.get("rows"), list):
            return 0.0
        return float(_same_result(verdict["rows"], verdict["reference"], _ordered(reference)))

    return _pool_map(one, list(zip(responses, schema, answer)), workers)


# The math checker, run inside the sandbox: math-verify parses the model's text (LaTeX, or an expression of digits
# and operators) and SymPy compares it with the gold answer. The harness imports them once, then forks one child
# per item and kills it at per_item_s: an answer that keeps SymPy busy in C code (9^(9^9)), where no alarm can
# interrupt it, costs per_item_s and only its own score.
_MATH_HARNESS = r"""
import json, os, select, signal, sys, warnings
warnings.filterwarnings("ignore")
nonce = sys.stdin.readline().strip()
def emit(message):
    print(json.dumps({"nonce": nonce, **message}), flush=True)
emit({"started": True})
per_item_s = float(sys.argv[1])
import logging
logging.disable(logging.WARNING)
from math_verify import parse, verify
inner_s = max(1, int(per_item_s) + 1)  # math-verify's own alarms: later than the kill below
def check(gold, response):
    target = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=inner_s)
    return bool(target) and verify(target, parse(response, parsing_timeout=inner_s), timeout_seconds=inner_s)
check("1", "\\boxed{\\frac{2}{2}}")  # the parsers' lazy start, once here rather than in every child
for i, (gold, response) in enumerate(json.load(open("items.json"))):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            ok = check(gold, response)
        except BaseException:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], per_item_s)
    answer = os.read(read, 1) if ready else b""
    os.close(read)
    if not answer:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    emit({"i": i, "ok": answer == b"1", "timed_out": not ready})
"""

MAX_MATH_CHARS = 10_000  # the end of a longer response is checked: that is where the final answer is


@register("math")
def math_answer(prompts: list[str], responses: list[str], answer: list[str], *, per_item_s: float = 2.0,
                timeout_s: float = 60.0, memory_mb: int = 2048, **_) -> list[float | None]:
    """1.0 where the response's final answer (its last ``\\boxed{}``, else its last number or expression) is
    mathematically equal to the row's ``answer`` (LaTeX or plain: ``\\frac{1}{2}`` matches ``0.5``, ``(x+1)^2``
    matches ``x^2+2x+1``), by Hugging Face's math-verify; else 0.0. It runs in the sandbox, each item in a process
    of its own killed at ``per_item_s``, so an answer that hangs the checker scores 0.0 and costs no other item its
    score; items the batch's ``timeout_s`` leaves unchecked are None (counted failures). Keep ``reward.timeout_s``
    above the checker's start (about 2 s) plus ``per_item_s`` for each answer that may hang.
    """
    scores: list[float | None] = [None] * len(responses)
    items = [[str(a), r[-MAX_MATH_CHARS:]] for a, r in zip(answer, responses)]
    limits = Limits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb)
    try:
        verdicts = _run_harness(_MATH_HARNESS, per_item_s, {"items.json": json.dumps(items)}, limits)
    except _HarnessFailed as exc:
        log.warning("math: batch not scored: %s", exc)
        return scores
    for verdict in verdicts:
        i = verdict.get("i")
        if isinstance(i, int) and 0 <= i < len(scores) and scores[i] is None:
            scores[i] = float(verdict.get("ok") is True)
    return scores
