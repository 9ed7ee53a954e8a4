"""The card of the shipped base model (models/base/README.md and eval.json), written by ops/build_base.sh from the
pretraining run: what the model is, what it was trained on, how well it does each task family, what the build took.

    python -m rollout.base_card RUN_DIR SECONDS MODEL_DIR
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

from rollout.tasks import FAMILIES


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_card(run_dir: Path, seconds: int, model_dir: Path) -> dict:
    import yaml

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    tasks = cfg["data"]["tasks"]
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final.get("final"), f"{run_dir}/metrics.jsonl does not end with the final evaluation"
    target, *rest = tasks["eval"]
    by_family = {f: {k.split("/")[2]: v for k, v in final.items() if k.startswith(f"eval/{name}/")}
                 for f, name in ((target, "target"), *((f, f) for f in rest))}
    weights = model_dir / "model.safetensors"
    model_cfg = json.loads((model_dir / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    info = {
        "built_by": "ops/build_base.sh (make base) = chorus train configs/pretrain_base.yaml",
        "commit": _commit(), "build_seconds": seconds, "train_seconds": summary["wall_seconds"],
        "steps": summary["steps"], "machine": f"{os.cpu_count()} CPU cores, {_cpu()}",
        "parameters": params, "bytes": weights.stat().st_size,
        "mixture": tasks["mixture"], "expert_rows": tasks["num_expert"], "seed": tasks["seed"],
        "held_out_rows_per_family": tasks["num_eval"],
        "accuracy": {f: m["accuracy"] for f, m in by_family.items()},
    }
    (model_dir / "eval.json").write_text(json.dumps(info, indent=2) + "\n")
    share = sum(tasks["mixture"].values())
    rows = "\n".join(
        f"| `{f}` | `{FAMILIES[f](random.Random(7))[0]}` | {FAMILIES[f].__doc__.split(':')[0]} | "
        f"{100 * tasks['mixture'].get(f, 0) / share:.1f}% | **{by_family[f]['accuracy']:.3f}** |"
        for f in by_family)
    (model_dir / "README.md").write_text(f"""# chorus base model

A {params / 1e6:.2f}M-parameter Llama-type causal LM ({model_cfg['num_hidden_layers']} layers, hidden
{model_cfg['hidden_size']}, {model_cfg['num_attention_heads']} heads of {model_cfg['head_dim']}) with a character-level
tokenizer, pretrained by chorus itself from random weights: pure SFT (mu = 1) on {tasks['num_expert']:,} generated
rows of {len(tasks['mixture'])} task families, {summary['steps']} steps of 128 rows: a model that knows something, to
post-train (`model.path: models/base`) and to measure forgetting on (the held-out sets below).

Rebuild: `make base` (`ops/build_base.sh`: `chorus train configs/pretrain_base.yaml`, then this directory).
Built at commit {info['commit']} in {seconds // 60} min {seconds % 60} s on {info['machine']}.

## What it knows
Greedy exact-match accuracy on each family's {tasks['num_eval']} held-out rows (`rollout/tasks.py`; no run with
seed {tasks['seed']} trains on them):

| family | prompt | task | share of the mixture | accuracy |
|---|---|---|---|---|
{rows}

The prompt is the text before the answer; the model writes the answer and its end token. A family with no share of
the mixture is a post-training target: what the base does without having been taught it.
""")
    return info


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(json.dumps(write_card(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])), indent=2))
