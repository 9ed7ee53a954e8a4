"""What the execution rewards cost per sample on the path training uses (RewardActor -> reward process -> sandbox).

    python bench/reward_cost.py [--rows 16] [--calls 3] [--only code_exec_io ...]

For each case, scores ``--rows`` correct answers ``--calls`` times through a RewardActor (process isolation, as in
training) and prints the median seconds per call, the milliseconds per sample, and the mean score, which must be
1.0: a path that scores correct answers 0 (the sandbox failing, as it did as root before issue 13) shows here.
exact_match is the isolation's own overhead. Run it from another checkout's root (``PYTHONPATH=OLD python
bench/reward_cost.py``) to compare two versions; run both back to back, the figures move from run to run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor

SCHEMA = "CREATE TABLE emp (name TEXT, dept TEXT, salary REAL);\n" \
         "INSERT INTO emp VALUES ('ann', 'ops', 100), ('bob', 'ops', 80), ('cid', 'dev', 120);"
CASES = {  # name -> (reward, one correct row)
    "exact_match": ("exact_match", {"response": "cba", "answer": "cba"}),
    "code_exec_io": ("code_exec", {"response": "```python\nprint(int(input()) * 2)\n```",
                                   "tests": [{"input": "2\n", "output": "4"}, {"input": "21\n", "output": "42"}]}),
    "code_exec_assert": ("code_exec", {"response": "def double(x):\n    return 2 * x",
                                       "tests": ["assert double(2) == 4", "assert double(-3) == -6",
                                                 "assert sorted([double(1), double(0)]) == [0, 2]"]}),
    "sql_exec": ("sql_exec", {"response": "SELECT dept, AVG(salary) FROM emp GROUP BY dept", "schema": SCHEMA,
                              "answer": "SELECT dept, SUM(salary) / COUNT(*) FROM emp GROUP BY dept"}),
    "math": ("math", {"response": "So it is \\boxed{\\frac{1}{2}}", "answer": "0.5"}),
}


def measure(case: str, rows: int, calls: int) -> tuple[list[float], float]:
    reward, row = CASES[case]
    actor = RewardActor(RewardConfig(functions=[RewardFnConfig(name=reward)], timeout_s=300))
    try:
        data = [{"prompt": "q", **{k: v for k, v in row.items() if k != "response"}}] * rows
        times, scores = [], []
        for _ in range(calls):
            start = time.perf_counter()
            scored, _ = actor.score(["q"] * rows, [row["response"]] * rows, data)
            times.append(time.perf_counter() - start)
            scores += [s.total for s in scored]
        return times, statistics.mean(scores)
    finally:
        actor.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    print(f"{'case':>16} {'rows':>5} {'median s/call':>14} {'ms/sample':>10} {'mean score':>11}")
    for case in args.only:
        times, score = measure(case, args.rows, args.calls)
        median = statistics.median(times)
        print(f"{case:>16} {args.rows:>5} {median:>14.3f} {1e3 * median / args.rows:>10.1f} {score:>11.3f}",
              flush=True)


if __name__ == "__main__":
    main()
