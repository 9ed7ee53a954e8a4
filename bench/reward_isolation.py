"""What running a reward in its own process costs: RewardActor.score latency, thread vs process isolation.

    python bench/reward_isolation.py [--calls 200] [--rows 64 512] [--chars 16 2000]

Prints the median and p90 seconds per call of exact_match (which itself takes microseconds, so the figure is the
isolation's overhead: msgpack both ways through a pipe, and the wake-ups) for each batch shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor


def measure(isolation: str, rows: int, chars: int, calls: int) -> list[float]:
    actor = RewardActor(RewardConfig(functions=[RewardFnConfig(name="exact_match", isolation=isolation)]))
    try:
        responses = ["a" * chars] * rows
        data = [{"prompt": "p", "answer": "a" * chars}] * rows
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            scored, _ = actor.score(["p"] * rows, responses, data)
            times.append(time.perf_counter() - start)
            assert scored[0].total == 1.0
        return times
    finally:
        actor.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--chars", type=int, nargs="+", default=[16, 2000])
    args = parser.parse_args()
    print(f"{'rows':>5} {'chars':>6} {'isolation':>9} {'median ms':>10} {'p90 ms':>8}")
    for rows in args.rows:
        for chars in args.chars:
            for isolation in ("thread", "process"):
                t = sorted(measure(isolation, rows, chars, args.calls))
                print(f"{rows:>5} {chars:>6} {isolation:>9} {1e3 * statistics.median(t):>10.2f} "
                      f"{1e3 * t[int(0.9 * len(t))]:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
