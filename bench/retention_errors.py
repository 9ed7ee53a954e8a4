"""What a post-trained model gets wrong on a retention set, next to the base: where forgetting comes from.

    .venv/bin/python bench/retention_errors.py MODEL_DIR [MODEL_DIR ...] [--family sort] [--base models/base]

Greedy generation (the engines' transformers backend) on the family's held-out rows (seed 0, 200 rows, the ones
the presets evaluate on). For each model: accuracy, and of the wrong answers how many have the input's letters in
another order, another length, or other letters; and of the letters a wrong answer holds beyond the input's, how
many are a-e, the alphabet of the post-training target (sortrep). The comparison in docs/benchmarks/algorithms.md
quotes it for the `sort` retention set.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def greedy(model_dir: str, prompts: list[str], max_new_tokens: int = 10) -> list[str]:
    """The answers of the engines' HF backend, as a run's evaluation gets them (float32, one batch, greedy)."""
    from rollout.engine import HFBackend
    from rollout.types import SamplingSpec

    engine = HFBackend(model_dir, dtype="float32", seed=0)
    ids = [engine.tokenizer(p).input_ids for p in prompts]
    return [c.text.strip() for c in engine.generate(ids, SamplingSpec(max_new_tokens=max_new_tokens, temperature=0))]


def classify(rows: list[dict], answers: list[str]) -> dict:
    kinds = collections.Counter()
    extra = collections.Counter()
    for row, got in zip(rows, answers):
        letters = row["prompt"].split(" ", 1)[1][:-1]  # "sort dbca=" -> "dbca"
        if got == row["answer"]:
            kinds["right"] += 1
            continue
        if sorted(got) == sorted(letters):
            kinds["wrong order"] += 1
        elif len(got) != len(letters):
            kinds["wrong length"] += 1
        else:
            kinds["other letters"] += 1
        surplus = collections.Counter(got) - collections.Counter(letters)
        extra.update("a-e" if c in "abcde" else "other" for c in surplus.elements())
    return {"accuracy": kinds.pop("right", 0) / len(rows), "wrong": dict(kinds), "surplus letters": dict(extra)}


def main() -> None:
    from rollout.tasks import make_task_sets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--family", default="sort", choices=["sort", "rev", "upper", "sortrep"])  # letter tasks
    parser.add_argument("--base", default=str(ROOT / "models" / "base"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = make_task_sets({args.family: 1}, [args.family], seed=0, num_prompts=1, num_expert=0,
                          num_eval=200)[f"eval/{args.family}"]
    for model_dir in [args.base, *args.models]:
        result = classify(rows, greedy(model_dir, [r["prompt"] for r in rows]))
        print(f"{model_dir}: {args.family} accuracy {result['accuracy']:.3f}; wrong: {result['wrong']}; letters "
              f"beyond the input's: {result['surplus letters']}", flush=True)


if __name__ == "__main__":
    main()
