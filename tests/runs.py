"""A training run as the integration tests run one: start a Trainer, train, shut it down, read its step records."""

from __future__ import annotations

import json
from pathlib import Path


def train(cfg, run_dir: Path) -> list[dict]:
    """Run ``cfg`` in ``run_dir`` to the end; its metrics.jsonl step records (the final evaluation's line left out).
    The trainer is closed whatever happens."""
    from actors.driver import Trainer

    trainer = Trainer(cfg, run_dir)
    try:
        trainer.run()
    finally:
        trainer.close()
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open() if '"final"' not in line]
