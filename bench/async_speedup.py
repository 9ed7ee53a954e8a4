"""Async mode's speedup, measured against the bound its phase times allow.

    .venv/bin/python bench/async_speedup.py [--backend hf|vllm] [--steps 60] [--skip 5]

Runs the from-scratch reversal task (configs/from_scratch/reverse.yaml; mu held at 0.5, so every step generates and
trains) twice with the same seed: synchronous (train.max_staleness=0) and async (1). From the synchronous run's phase
times, G = generate + reward and T = train + sync per step; overlapping them at best gives (G + T) / max(G, T). The
achieved speedup is the ratio of mean step times (the first --skip steps, which include warm-up, left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(staleness: int, args, run_dir: Path) -> list[dict]:
    from actors.config import load_config
    from actors.driver import Trainer

    cfg = load_config(ROOT / "configs" / "from_scratch" / "reverse.yaml", [
        f"rollout.backend={args.backend}", "algo.mu_peak=0.5", "algo.mu_valley=0.5", "algo.mu_decay_steps=0",
        f"train.steps={args.steps}", "train.eval_every=0", "train.eval_max_rows=20",
        f"train.max_staleness={staleness}"])
    trainer = Trainer(cfg, run_dir)
    try:
        trainer.run()
    finally:
        trainer.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"final"' not in line][args.skip:]


def mean(records: list[dict], *keys: str) -> float:
    return sum(sum(r[k] for k in keys) for r in records) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--runs-dir", default="runs/async-speedup")
    args = parser.parse_args()
    import time

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        sync = run(0, args, Path(args.runs_dir) / stamp / "sync")
        asyn = run(1, args, Path(args.runs_dir) / stamp / "async")
    finally:
        ray.shutdown()
    g = mean(sync, "generate_seconds", "reward_seconds")
    t = mean(sync, "train_seconds", "sync_seconds")
    step_sync, step_async = mean(sync, "step_seconds"), mean(asyn, "step_seconds")
    ideal = (g + t) / max(g, t)
    print(f"backend {args.backend}, {len(sync)} steps measured of {args.steps}")
    print(f"sync:  step {step_sync:.3f}s  (G = generate + reward {g:.3f}s, T = train + sync {t:.3f}s)")
    print(f"async: step {step_async:.3f}s  (waiting for rollouts {mean(asyn, 'rollout_wait_seconds'):.3f}s, "
          f"generate {mean(asyn, 'generate_seconds'):.3f}s and train {mean(asyn, 'train_seconds'):.3f}s "
          f"while overlapped)")
    print(f"speedup: achieved {step_sync / step_async:.2f}x, ideal (G + T) / max(G, T) = {ideal:.2f}x")
    print(f"final reward: sync {sync[-1]['reward_mean']:.3f}, async {asyn[-1]['reward_mean']:.3f}")


if __name__ == "__main__":
    main()
