"""``chorus eval MODEL_DIR CONFIG``: evaluate a saved model on a config's held-out sets, without training.

The model is any Hugging Face directory chorus wrote (a run's ``final/``, a checkpoint's ``model/``, the shipped
base). The config says which sets (``data.eval``, ``data.retention``, or ``data.tasks``), how to generate
(``rollout``: backend, engines, ``max_new_tokens``) and how many samples give pass@n (``train.eval_samples``).
Only the rollout engines start, on a local Ray cluster (or ``ray.address``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from actors import datasets
from actors.config import ChorusConfig, ConfigError
from actors.evaluation import Evaluator, EvalSet


def evaluate_model(cfg: ChorusConfig, model_dir: str) -> dict[str, dict[str, float]]:
    """``{set: {metric: value}}`` as :meth:`Evaluator.run` returns it, plus ``{"": {"seconds", "rows"}}``."""
    import ray
    from transformers import AutoTokenizer

    from actors import pools
    from actors.episodes import EnvGroup, Limits, play
    from actors.rollouts import generate

    if not (Path(model_dir) / "config.json").is_file():
        what = "does not exist" if not Path(model_dir).exists() else "holds no config.json"
        raise ConfigError(f"MODEL_DIR '{model_dir}' {what}: give a Hugging Face model directory (a run's final/, "
                          f"a checkpoint's model/)")
    work = Path(tempfile.mkdtemp(prefix="chorus-eval-"))
    own_ray = False
    rollouts = envs = None
    try:
        data = datasets.load(cfg.data, work / "data", eval_max_rows=cfg.train.eval_max_rows, only_eval=True)
        tokens = datasets.tokenize(data, AutoTokenizer.from_pretrained(model_dir),
                                   chat_template=cfg.model.chat_template, model=model_dir)
        sets = [EvalSet(name, rows, tokens.eval_sets[name]) for name, rows in data.eval_sets.items()]
        evaluator = Evaluator(sets, max_new_tokens=cfg.rollout.max_new_tokens, samples=cfg.train.eval_samples,
                              seed=cfg.train.seed)
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
        if not ray.is_initialized():
            own_ray = not address
            if address:
                ray.init(address=address)
            else:
                ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
        (work / "weights").mkdir()  # no weights file: the engines serve model_dir as it is
        rollouts = pools.start_rollouts(cfg, model_dir, work / "weights")
        envs = pools.start_envs(cfg)
        if envs is None:
            results = evaluator.run(lambda rows, prompts, spec: generate(rollouts, prompts, spec))
        else:  # multi-turn episodes, as training plays them
            results = evaluator.run(lambda rows, prompts, spec: play(
                lambda p, s: generate(rollouts, p, s), EnvGroup(envs), rows, prompts, spec, tokens.renderer,
                Limits.of(cfg)))
        results[""]["rows"] = sum(len(s.rows) for s in sets)
        return results
    finally:
        for group in (rollouts, envs):
            if group is not None:
                group.shutdown()
        if own_ray and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def format_results(results: dict[str, dict[str, float]], model_dir: str) -> str:
    metrics = sorted({k for name, m in results.items() if name for k in m if k.startswith("pass@")},
                     key=lambda k: int(k.removeprefix("pass@")))
    head = f"{'set':<12}{'accuracy':>10}" + "".join(f"{k:>10}" for k in metrics) + f"{'tokens':>9}"
    lines = [f"model {model_dir}", head]
    for name, m in results.items():
        if name:
            lines.append(f"{name:<12}{m['accuracy']:>10.3f}"
                         + "".join(f"{m[k]:>10.3f}" if k in m else f"{'-':>10}" for k in metrics)
                         + f"{m['response_tokens']:>9.1f}")
    lines.append(f"({results['']['rows']} rows in {results['']['seconds']:.1f} s; accuracy: greedy exact match; "
                 f"tokens: mean greedy response length)")
    return "\n".join(lines)
