"""Per-step time split of a finished run, from its metrics.jsonl.

    .venv/bin/python bench/phases.py RUN_DIR [--skip 5]

Prints the mean seconds per step of each phase (generate / reward / train / sync / other) over the training
steps (the first --skip steps, which include warm-up, left out), the evaluation time, and the final accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from actors.metrics import STEP_PHASES as PHASES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--skip", type=int, default=5)
    args = parser.parse_args()
    run = Path(args.run_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    steps = [r for r in records if "step_seconds" in r][args.skip:]
    mean = {p: sum(r[f"{p}_seconds"] for r in steps) / len(steps) for p in PHASES}
    total = sum(r["step_seconds"] for r in steps) / len(steps)
    summary = json.loads((run / "summary.json").read_text())
    print(f"steps {len(steps)} (after skipping {args.skip}); mean step {total:.3f}s")
    print("  ".join(f"{p} {mean[p]:.3f}s ({100 * mean[p] / total:.0f}%)" for p in PHASES))
    print(f"wall {summary['wall_seconds']:.1f}s for {summary['steps']} steps incl. evaluation; "
          f"final eval accuracy {summary['final_eval_accuracy']:.3f}")


if __name__ == "__main__":
    main()
