"""Compare the algorithm presets at the same sample budget and seeds: from the pretrained base (configs/<preset>.yaml:
sorting letters that repeat, with retention sets of the base's other skills) and from a random initialisation
(configs/from_scratch/<preset>.yaml: string reversal, and a harder variant).

    .venv/bin/pip install -e ".[bench]"          # matplotlib, for the plot
    .venv/bin/python bench/compare_algorithms.py --tasks base [--budget 12800] [--seeds 0 1 2] [--presets sft ...]
    .venv/bin/python bench/compare_algorithms.py --tasks random-init random-init-harder --budget 32000
    .venv/bin/python bench/compare_algorithms.py --tasks base-rl --out docs/benchmarks/rl_core.md   # the RL core
    .venv/bin/python bench/compare_algorithms.py --resume runs/compare/STAMP/results.json   # after an interruption

Every run trains on the same number of rows (on-policy samples + expert rows): a preset with 128 rows per step gets
half the steps of one with 64. Schedules scale with the run: SFT-then-RL switches at 30% of its steps, the CHORD
mu decay spans 60%, the learning rate decays over the whole run (SFT-then-RL: over its SFT phase, so that RL runs at
the decayed rate). Each run evaluates its starting model, every ``steps // --evals`` steps and after its last step
(so ``--evals`` or ``--evals + 1`` times): greedy exact match on the target's held-out set and on each retention
set, and pass@k on the target where the preset samples for it. ``--presets`` reruns some presets of a task and
keeps the saved runs of the others.

A preset is a config stem with overrides (``grpo_bf16`` is configs/grpo_tis.yaml without the correction); a task
adds its own overrides to every preset (``base-rl``: 4 optimiser steps per rollout batch, so that the clip ranges and
importance weights act on off-policy ratios; with one on-policy step the ratio is 1). Besides accuracy, each run
keeps the means over its steps of clip_frac, DAPO's dynamic sampling (filtered groups, sampling rounds, samples
generated per trained sample) and, where the learner recomputes log-probabilities, the engine/learner mismatch.

Writes ``--out`` (docs/benchmarks/algorithms.md) and the same name's .png (accuracy against training rows), and keeps
every task's results in the same name's .json, so a run of some tasks rewrites the report with the others' saved
results; what the report has below its hand-written marker is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # name -> (config stem, overrides)
    **{p: (p, []) for p in ("sft", "grpo", "ppo", "sft_then_rl", "chord_mu", "chord_phi", "chord",
                             "dapo", "gspo", "grpo_tis")},
    "grpo_bf16": ("grpo_tis", ["algo.is_correction=none"]),  # the bfloat16 engine's mismatch, uncorrected
}
MIXING = ("sft", "grpo", "ppo", "sft_then_rl", "chord_mu", "chord_phi", "chord")
RL_CORE = ("grpo", "dapo", "gspo", "grpo_tis", "grpo_bf16")
TASKS = {  # name -> (config of a preset, overrides, the presets run by default)
    "base": ("configs/{}.yaml", [], MIXING),  # the pretrained base on sortrep (sorting letters that repeat) + retention
    "base-rl": ("configs/{}.yaml", ["algo.mini_batches=4"], RL_CORE),  # the same, 4 optimiser steps per rollout batch
    "random-init": ("configs/from_scratch/{}.yaml", [], MIXING),  # a random 1.4M model reversing 3-5 letters of abcdef
    "random-init-harder": ("configs/from_scratch/{}.yaml", [
        "data.synthetic.alphabet=abcdefgh", "data.synthetic.min_len=4", "data.synthetic.max_len=7",
        "rollout.max_new_tokens=10"], MIXING),
}
FROM_BASE = ("base", "base-rl")  # tasks with retention sets
STEP_MEANS = ("clip_frac", "filtered_groups", "sample_rounds", "mismatch_kl", "is_ratio", "is_weight",
              "is_ratio_outside", "is_seq_outside")  # metrics.jsonl keys averaged over a run's steps
MISMATCH = STEP_MEANS[3:]
RENAMED = {"quickstart": "random-init", "harder": "random-init-harder"}  # names in results saved before the base
TARGET = 0.9  # random-init tasks: rows and time to reach this accuracy
NOTES = "<!-- hand-written below: kept when the report is rewritten -->"


def _scale(cfg, preset: str, steps: int, evals: int) -> None:
    """Fit the run's schedules to ``steps``."""
    a = cfg.algo
    cfg.train.steps = steps
    cfg.train.eval_every = max(1, steps // evals)
    cfg.learner.decay_steps = steps * a.epochs * a.mini_batches  # counts optimiser steps
    if preset == "sft_then_rl":
        a.mu_hold_steps = int(0.3 * steps)
        cfg.learner.decay_steps = a.mu_hold_steps * a.epochs * a.mini_batches  # RL at the decayed rate
    elif a.mu_decay_steps:
        a.mu_decay_steps = int(0.6 * steps)
    cfg.critic.decay_steps = cfg.learner.decay_steps


def _rows(cfg) -> int:
    """Training rows of the whole run: on-policy rows on steps with mu < 1, expert rows on steps with mu > 0."""
    from actors.scheduler import Scheduler

    sched = Scheduler(cfg.algo, cfg.rollout.n, 1, 1, 0)
    rl = cfg.algo.prompts_per_step * cfg.rollout.n
    return sum((rl if mu < 1.0 else 0) + (sched.num_expert if mu > 0.0 else 0)
               for mu in map(sched.mu, range(cfg.train.steps)))


def plan_run(preset: str, task: str, seed: int, budget: int, evals: int):
    """The preset's config with the most steps whose rows fit in ``budget``, schedules scaled to match."""
    from actors.config import load_config

    path, overrides, _ = TASKS[task]
    stem, variant = PRESETS[preset]
    cfg = load_config(ROOT / path.format(stem), overrides + variant + [f"train.seed={seed}"])
    cfg.train.eval_at_start = True  # every curve starts at 0 rows
    steps = 10
    while True:
        _scale(cfg, preset, steps + 1, evals)
        if _rows(cfg) > budget:
            break
        steps += 1
    _scale(cfg, preset, steps, evals)
    return cfg


def run_one(cfg, run_dir: Path) -> dict:
    """One run; its curve holds a point per evaluation: training rows so far, the target's accuracy, each
    retention set's accuracy, pass@k on the target (where sampled) and wall seconds of training so far. ``step_means``
    holds the means over its steps of STEP_MEANS (those it logs) and ``generated_per_trained``: on-policy samples
    generated per on-policy sample trained on (above 1 with dynamic sampling: each round generates prompts_per_step
    groups; filtered groups and a last round's surplus are not trained on)."""
    from actors.driver import Trainer

    trainer = Trainer(cfg, run_dir)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    samples, wall, curve, steps = 0, 0.0, [], []
    for r in map(json.loads, (run_dir / "metrics.jsonl").open()):
        if not (r.get("initial") or r.get("final")):
            samples += r["samples"] + r["expert_rows"]
            wall += r["step_seconds"] + r.get("eval_seconds", 0.0)
            steps.append(r)
        if "eval_accuracy" in r:
            sets = {k.split("/")[1]: v for k, v in r.items() if k.startswith("eval/") and k.endswith("/accuracy")}
            sets.pop("target", None)
            passk = {k.split("/")[2]: v for k, v in r.items() if k.startswith("eval/target/pass@")}
            curve.append({"rows": samples, "accuracy": r["eval_accuracy"], "retention": sets, "pass": passk,
                          "wall": wall})
    reached = next((p for p in curve if p["accuracy"] >= TARGET), None)
    means = {k: statistics.mean(vs) for k in STEP_MEANS if (vs := [r[k] for r in steps if r.get(k) is not None])}
    trained = sum(r["samples"] for r in steps)
    if trained:
        group = cfg.algo.prompts_per_step * cfg.rollout.n
        means["generated_per_trained"] = sum(r["sample_rounds"] * group for r in steps if r["samples"]) / trained
    return {"final": summary["final_eval_accuracy"], "curve": curve, "steps": cfg.train.steps, "step_means": means,
            "reach_samples": reached["rows"] if reached else None, "reach_wall": reached["wall"] if reached else None,
            "reach_step": None if reached is None else round(reached["rows"] / max(1, curve[-1]["rows"])
                                                             * cfg.train.steps),
            "wall": summary["wall_seconds"]}


def _upgrade(run: dict) -> dict:
    """A run saved before curves were records: (rows, accuracy, wall) triples."""
    if run["curve"] and isinstance(run["curve"][0], list):
        run["curve"] = [{"rows": s, "accuracy": a, "retention": {}, "pass": {}, "wall": w} for s, a, w in run["curve"]]
    return run


def _mean(xs: list) -> str:
    got = [x for x in xs if x is not None]
    if not got:
        return "not reached"
    text = f"{statistics.mean(got):.0f}"
    return text if len(got) == len(xs) else f"{text} ({len(got)}/{len(xs)} seeds)"


def _pm(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def _retention(point: dict) -> float | None:
    values = list(point["retention"].values())
    return sum(values) / len(values) if values else None


def _base_table(task: dict) -> list[str]:
    presets = task["presets"]
    first = next(iter(presets.values()))[0]["curve"]
    families = list(first[0]["retention"])
    passk = sorted({k for runs in presets.values() for r in runs for k in r["curve"][-1]["pass"] if k != "pass@1"})
    start = first[0]
    starts = [r["curve"][0] for runs in presets.values() for r in runs]
    lines = [f"The base before post-training: target accuracy {start['accuracy']:.3f} (greedy, the same for every run)"
             + "".join(f", {k} {_pm([p['pass'][k] for p in starts])} (sampled with each run's seed)"
                       for k in passk if all(k in p["pass"] for p in starts))
             + f"; retention mean {_retention(start):.3f} ("
             + ", ".join(f"{f} {start['retention'][f]:.3f}" for f in families) + ").", "",
             "| preset | steps | target accuracy | " + "".join(f"{k} | " for k in passk)
             + "retention mean | " + "".join(f"{f} | " for f in families) + "wall s |",
             "|---|---|---|" + "---|" * (len(passk) + 1 + len(families)) + "---|"]
    for preset, runs in presets.items():
        ends = [r["curve"][-1] for r in runs]
        cells = [preset, str(runs[0]["steps"]), _pm([e["accuracy"] for e in ends])]
        cells += [_pm([e["pass"][k] for e in ends]) if all(k in e["pass"] for e in ends) else "-" for k in passk]
        cells.append(_pm([_retention(e) for e in ends]))
        cells += [_pm([e["retention"][f] for e in ends]) for f in families]
        cells.append(f"{statistics.mean(r['wall'] for r in runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pm_g(xs: list[float]) -> str:
    """Mean ± sd with 4 significant digits, for metrics of any scale; 6 near 1 (is_ratio moves in the fifth)."""
    mean, sd = statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean:.6g} ± {sd:.2g}" if abs(mean - 1.0) < 0.01 else f"{mean:.4g} ± {sd:.2g}"


def _step_tables(task: dict) -> list[str]:
    """Means over each run's steps (then over seeds): clipping and DAPO's extra generation for every preset; the
    engine/learner mismatch for the presets that measure it. Empty for runs saved before step means were kept."""
    presets = {p: runs for p, runs in task["presets"].items() if all("step_means" in r for r in runs)}
    if not presets:
        return []

    def cell(runs, key):
        values = [r["step_means"].get(key) for r in runs]
        return "-" if None in values else _pm_g(values)

    lines = ["Means over each run's steps: the share of tokens the clip acted on, and what DAPO's dynamic sampling cost "
             "(groups with all rewards equal filtered out, generation rounds, samples generated per sample trained on).",
             "", "| preset | clip_frac | filtered groups per step | sampling rounds per step | generated per trained |",
             "|---|---|---|---|---|"]
    for preset, runs in presets.items():
        lines.append(f"| {preset} | {cell(runs, 'clip_frac')} | {cell(runs, 'filtered_groups')} | "
                     f"{cell(runs, 'sample_rounds')} | {cell(runs, 'generated_per_trained')} |")
    measured = {p: runs for p, runs in presets.items() if all("mismatch_kl" in r["step_means"] for r in runs)}
    if measured:
        lines += ["", "Mismatch of a bfloat16 engine against a float32 learner, with and without TIS (means over each "
                  "run's steps; rho = p_learner / p_engine per token, C = algo.is_cap):", "",
                  "| preset | mismatch_kl | is_ratio | is_weight | is_ratio_outside | is_seq_outside |",
                  "|---|---|---|---|---|---|"]
        for preset, runs in measured.items():
            lines.append("| " + " | ".join([preset] + [cell(runs, k) for k in MISMATCH]) + " |")
    return lines + [""]


def _scratch_table(task: dict) -> list[str]:
    lines = ["| preset | steps | final accuracy | steps to 0.9 | samples to 0.9 | wall s to 0.9 | wall s total |",
             "|---|---|---|---|---|---|---|"]
    for preset, runs in task["presets"].items():
        lines.append(f"| {preset} | {runs[0]['steps']} | {_pm([r['final'] for r in runs])} | "
                     f"{_mean([r['reach_step'] for r in runs])} | {_mean([r['reach_samples'] for r in runs])} | "
                     f"{_mean([r['reach_wall'] for r in runs])} | {_mean([r['wall'] for r in runs])} |")
    return lines


TITLES = {"base": "From the pretrained base: sorting letters that repeat, and what the base keeps",
          "base-rl": "The RL core from the pretrained base: GRPO, DAPO, GSPO and a bfloat16 engine with and without "
                     "TIS, 4 optimiser steps per rollout batch",
          "random-init": "From a random initialisation: string reversal",
          "random-init-harder": "From a random initialisation: a harder reversal (8 letters, strings of 4-7)"}


def write_report(results: dict, out: Path) -> None:
    lines = ["# Algorithm comparison", "",
             "Every preset at the same budget of training rows (on-policy samples + expert rows) and seeds; means "
             "over seeds, ± the standard deviation; accuracy is greedy exact match on held-out rows.", ""]
    for name in [t for t in TASKS if t in results]:
        task = results[name]
        lines += [f"## {TITLES[name]}", "",
                  f"`{task['command']}` on {task['date']}, {task['machine']}: {task['budget']} rows per run, seeds "
                  f"{task['seeds']}.", ""]
        lines += _base_table(task) if name in FROM_BASE else _scratch_table(task)
        lines.append("")
        lines += _step_tables(task)
    lines += [f"![accuracy against training rows]({out.with_suffix('.png').name})", ""]
    notes = out.read_text().partition(NOTES)[2] if out.exists() else ""
    lines += [NOTES + notes.rstrip("\n") if notes.strip() else NOTES, ""]
    out.write_text("\n".join(lines))


def _curve(runs: list[dict], key) -> tuple[list[int], list[float]]:
    xs = [p["rows"] for p in runs[0]["curve"]]
    ys = [statistics.mean(key(r["curve"][i]) for r in runs) for i in range(len(xs))]
    return xs, ys


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (title, task, y of a curve point)
    for name in [t for t in TASKS if t in results]:
        if name in FROM_BASE:
            panels += [(f"{name}: target (sortrep: sorting letters that repeat)", name, lambda p: p["accuracy"]),
                       (f"{name}: retention (mean of the other skills)", name, _retention)]
        else:
            panels.append((name, name, lambda p: p["accuracy"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, name, key) in zip(axes[0], panels):
        for preset, runs in results[name]["presets"].items():
            xs, ys = _curve(runs, key)
            ax.plot(xs, ys, marker="o", markersize=3, label=preset)
        if name not in FROM_BASE:
            ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training rows (samples + expert rows)")
        ax.set_ylabel("held-out accuracy")
        if "retention" not in title:  # retention moves by hundredths: its own scale
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_results(path: Path) -> dict:
    """Saved results, by task; a file from before the base (one budget and seed list for all) is converted."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if "budget" in saved:  # the first layout: {"budget", "seeds", "tasks": {task: {preset: runs}}}
        return {RENAMED.get(t, t): {
            "budget": saved["budget"], "seeds": saved["seeds"], "date": "2026-11-22",
            "machine": "2-core CPU, 24 GiB, no GPU",
            "command": f"python bench/compare_algorithms.py --tasks {RENAMED.get(t, t)} --budget {saved['budget']} "
                       f"--seeds {' '.join(map(str, saved['seeds']))}",
            "presets": {p: [_upgrade(r) for r in runs] for p, runs in presets.items()}}
            for t, presets in saved["tasks"].items()}
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=12800, help="training rows per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS),
                        help="default: each task's own (base, random-init*: " + " ".join(MIXING) + "; base-rl: "
                             + " ".join(RL_CORE) + ")")
    parser.add_argument("--tasks", nargs="+", default=["base"], choices=list(TASKS))
    parser.add_argument("--evals", type=int, default=6, help="evaluate every steps // EVALS steps (and at the start and the end)")
    parser.add_argument("--runs-dir", default="runs/compare")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "algorithms.md"))
    parser.add_argument("--machine", default="2-core CPU, 24 GiB, no GPU")
    parser.add_argument("--from-results", action="store_true",
                        help="rewrite the report and plot from the saved results (algorithms.json), running nothing")
    parser.add_argument("--resume", metavar="RESULTS_JSON",
                        help="go on with an interrupted comparison: keep its runs, do the missing ones")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401  (fail now, not after an hour of runs)
    except ImportError:
        raise SystemExit('matplotlib is missing: .venv/bin/pip install -e ".[bench]"') from None
    out = Path(args.out)
    store = out.with_suffix(".json")
    saved = load_results(store)
    if args.from_results:
        write_report(saved, out)
        plot(saved, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)  # one cluster for every run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict = {}
    if args.resume:
        results = json.loads(Path(args.resume).read_text())
        for task in results.values():  # a shorter --seeds (its first seeds) drops the others' runs: out of time
            if task["budget"] != args.budget or task["seeds"][:len(args.seeds)] != args.seeds:
                raise SystemExit(f"{args.resume} was run with --budget {task['budget']} --seeds {task['seeds']}")
            task["command"] = task["command"].replace(f"--seeds {' '.join(map(str, task['seeds']))}",
                                                      f"--seeds {' '.join(map(str, args.seeds))}")
            task["seeds"] = args.seeds
            task["presets"] = {p: runs[:len(args.seeds)] for p, runs in task["presets"].items()}
        stamp = Path(args.resume).parent.name
        args.runs_dir = str(Path(args.resume).parent.parent)
    command = (f"python bench/compare_algorithms.py --tasks {' '.join(args.tasks)} --budget {args.budget} "
               f"--seeds {' '.join(map(str, args.seeds))} --evals {args.evals}"
               + (f" --presets {' '.join(args.presets)}" if args.presets else "")
               + (f" --out {args.out}" if out != ROOT / "docs" / "benchmarks" / "algorithms.md" else ""))
    try:
        for task in args.tasks:
            entry = results.setdefault(task, {"budget": args.budget, "seeds": args.seeds, "machine": args.machine,
                                              "command": command, "presets": {}})
            # seed-major, so that an interrupted comparison has every preset at its first seeds
            for seed, preset in ((s, p) for s in args.seeds for p in args.presets or TASKS[task][2]):
                if len(entry["presets"].get(preset, [])) == args.seeds.index(seed):  # runs go in seed order
                    cfg = plan_run(preset, task, seed, args.budget, args.evals)
                    run_dir = Path(args.runs_dir) / stamp / f"{task}-{preset}-s{seed}"
                    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted run left
                    run = run_one(cfg, run_dir)
                    entry["presets"].setdefault(preset, []).append(run)
                    end = run["curve"][-1]
                    kept = _retention(end)
                    print(f"{task:18s} {preset:12s} seed {seed}: target {run['curve'][0]['accuracy']:.3f} -> "
                          f"{run['final']:.3f}" + (f", retention {kept:.3f}" if kept is not None else "")
                          + f", {run['wall']:.0f}s, "
                          + ", ".join(f"{k} {v:.3g}" for k, v in run["step_means"].items()), flush=True)
                    entry["date"] = time.strftime("%Y-%m-%d")
                    Path(args.runs_dir, stamp, "results.json").write_text(json.dumps(results, indent=1))
    finally:
        ray.shutdown()
    for task, entry in results.items():  # a run of some presets replaces those presets' runs, keeps the others'
        kept = saved.get(task, {}).get("presets", {})
        saved[task] = {**entry, "presets": {**kept, **entry["presets"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(saved, indent=1))
    write_report(saved, out)
    plot(saved, out.with_suffix(".png"))
    print(f"wrote {out}, {store.name} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
