"""The ``chorus`` command line.

    chorus train CONFIG.yaml [--run-dir DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from actors.config import ConfigError, load_config
from rollout.data import DataError


def _train(args: argparse.Namespace) -> int:
    # A reward named `my_rewards:fn` is the user's module in the directory they run from, as with `python -m`.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before anything starts
    run_dir = Path(args.run_dir or Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    from actors.driver import Trainer

    trainer = Trainer(cfg, run_dir)
    print(f"chorus: run dir {run_dir}; metrics at {trainer.metrics.url}", flush=True)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    print(f"chorus: final eval accuracy {summary['final_eval_accuracy']:.3f} after {summary['steps']} steps "
          f"in {summary['wall_seconds']:.0f}s; model in {summary['model']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chorus", description="Mixed SFT + RL post-training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    train.add_argument("--run-dir", default="", help="where the config, metrics.jsonl and final/ go")
    train.set_defaults(func=_train)
    args, extra = parser.parse_known_args(argv)  # key=value overrides may come after --run-dir too
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"chorus: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"chorus: data error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
