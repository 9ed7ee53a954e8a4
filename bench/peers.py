"""chorus against TRL's GRPOTrainer: same machine, same model, same work per step, side by side in one run.

    .venv/bin/python bench/peers.py [--models 1.4m 27m] [--backends hf vllm] [--precisions fp32 bf16]
                                    [--variants '' compiled] [--out docs/benchmarks/peers.md]

Work per step, for every run: 8 prompts x 8 samples of at most 16 new tokens at temperature 1 (prompts of
chorus's `sortrep` task family), an exact-match reward, one AdamW step at lr 1e-3 on all 64 samples, no KL term (so
no reference model). Models: chorus's 1.4M-parameter recipe (configs/models/tiny_llama.json, the from-scratch
quickstart's) and a 27.4M one (configs/models/llama_27m.json: hidden 512, 8 layers), both from random weights:
this measures speed, not learning.

- TRL 1.16 runs in its own virtual environment (``.bench/trl``, made here on first use: CPU torch 2.13.0 and
  trl 1.16.0 from the registry) through bench/trl_grpo.py, with gradient checkpointing off (its default is on, which
  only trades speed for memory), in float32 and with ``bf16=True``.
- chorus runs ``chorus train configs/grpo.yaml`` (the user's path: Ray, the engines, DeepSpeed) with the overrides
  that make the same work, in float32 (learner and engines) and in bfloat16 (``learner.autocast=bfloat16``,
  ``rollout.dtype=bfloat16``), on each rollout backend, as configured and torch.compiled (rows marked "compiled":
  ``learner.compile=true``, and ``rollout.compile=true`` on the hf backend); threads per actor are the derived
  default.

Printed per run: the median step time after the warm-up steps (10 of 60 on the 1.4M model, 8 of 24 on the 27M),
samples/s, the ratio to TRL at the same
precision, the phase split (TRL: its generate-and-score method against the rest), and chorus's model-FLOPs
utilisation: 6 x matmul parameters x trained tokens (prompt + response) per train phase second, over this CPU's
matrix-product peak at the learner's precision and threads (measured here, on the model's own matrix shapes).
Writes a Markdown table to ``--out`` and the raw figures to the same name's .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRL_VENV = ROOT / ".bench" / "trl"
TRL_PINS = ("torch==2.13.0", "trl==1.16.0")
# recipe, steps, warm-up steps left out of the median (the first steps of every run are slower: allocators, caches)
MODELS = {"1.4m": ("configs/models/tiny_llama.json", 60, 10), "27m": ("configs/models/llama_27m.json", 24, 8)}
WORK = dict(prompts_per_step=8, n=8, max_new_tokens=16, lr=1e-3)
PRECISIONS = {"fp32": ["learner.autocast=''", "rollout.dtype=float32"],
              "bf16": ["learner.autocast=bfloat16", "rollout.dtype=bfloat16"]}
# chorus as configured by default, and torch.compiled: the learner (learner.compile) and, on the hf backend, the
# rollout model (rollout.compile). Both off by default, as their first step compiles for about a minute; the medians
# leave that step out
VARIANTS = {"": lambda backend: [],
            "compiled": lambda backend: ["learner.compile=true"] + ["rollout.compile=true"] * (backend == "hf")}


def trl_python() -> Path:
    """TRL's interpreter, its virtual environment made first if absent (a stamp marks a complete install)."""
    python, stamp = TRL_VENV / "bin" / "python", TRL_VENV / f".installed-{'-'.join(TRL_PINS)}"
    if not stamp.exists():
        print(f"peers: installing {' '.join(TRL_PINS)} into {TRL_VENV} (once)", flush=True)
        subprocess.run([_base_python(), "-m", "venv", str(TRL_VENV)], check=True)
        for pin in TRL_PINS:  # torch first, pinned: a plain `trl` would pull a CUDA torch
            subprocess.run([str(python), "-m", "pip", "install", "-q", pin], check=True)
        stamp.touch()
    return python


def _base_python() -> str:
    """The interpreter this virtual environment was made from (a venv's own python would nest venvs)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3.11") or "python3"


def matmul_peak(dtype: str, threads: int, shapes: list[tuple[int, int, int]]) -> float:
    """GFLOP/s of this CPU's matrix products at ``dtype`` on ``threads`` threads: the best of the model's shapes."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
        for _ in range(3):
            a @ b
        reps, start = 20, time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def model_facts(model_dir: str) -> dict:
    """Matmul parameters (every linear layer, the output head included; not the embedding table) and shapes."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return {"matmul_params": layers * per_layer + h * v, "shapes": [(2048, h, i), (2048, i, h), (2048, h, q)]}


def prompt_rows() -> list[dict]:
    """The prompts of configs/grpo.yaml's task (sortrep, seed 0): what chorus samples from, and TRL's data set."""
    from actors.config import load_config
    from rollout.tasks import make_task_sets

    t = load_config(ROOT / "configs" / "grpo.yaml").data.tasks
    sets = make_task_sets(dict(t.mixture), list(t.eval), seed=t.seed, num_prompts=t.num_prompts, num_expert=0,
                          num_eval=t.num_eval)
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in sets["prompts"]]


def run_trl(python: Path, model_dir: str, prompts: Path, steps: int, skip: int, bf16: bool, out: Path) -> dict:
    cmd = [str(python), str(ROOT / "bench" / "trl_grpo.py"), "--model", model_dir, "--prompts", str(prompts),
           "--steps", str(steps), "--prompts-per-step", str(WORK["prompts_per_step"]), "--n", str(WORK["n"]),
           "--max-new-tokens", str(WORK["max_new_tokens"]), "--lr", str(WORK["lr"]), "--out", str(out)]
    log = out.with_suffix(".log")
    with log.open("w") as f:
        subprocess.run(cmd + (["--bf16"] if bf16 else []), check=True, stdout=f, stderr=subprocess.STDOUT)
    r = json.loads(out.read_text())
    step = statistics.median(r["step_seconds"][skip:])
    gen = statistics.median(r["generate_seconds"][skip:]) if r["generate_seconds"] else None
    return {"step": step, "samples_per_s": r["rows_per_step"] / step,
            "phases": {"generate+reward": gen, "train": step - gen} if gen is not None else {}}


def run_chorus(model_dir: str, backend: str, settings: list[str], steps: int, skip: int, run_dir: Path, facts: dict,
               prompt_tokens: float) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"model.path={model_dir}", f"rollout.backend={backend}", f"rollout.n={WORK['n']}",
                 f"rollout.max_new_tokens={WORK['max_new_tokens']}", f"algo.prompts_per_step={WORK['prompts_per_step']}",
                 f"learner.lr={WORK['lr']}", "learner.decay_steps=0", "algo.kl_coef=0", f"train.steps={steps}",
                 "train.eval_every=0", "train.eval_at_start=false", "train.eval_samples=0", "train.eval_max_rows=8",
                 "checkpoint.every=0", *settings]
    cmd = [str(ROOT / ".venv" / "bin" / "chorus"), "train", str(ROOT / "configs" / "grpo.yaml"), "--run-dir",
           str(run_dir), *overrides]
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "step_seconds" in r][skip:]
    median = {k: statistics.median(r[f"{k}_seconds"] for r in records)
              for k in ("step", "generate", "reward", "train", "sync")}
    said = re.search(r"threads per actor: (.*?) \((?:synchronous|async)", log.read_text())
    threads = said[1].replace(" (derived)", "") if said else "?"  # what the run logged it gave each actor
    tokens = statistics.mean(r["samples"] * prompt_tokens + r["tokens"] for r in records)  # trained per step
    flops = 6 * facts["matmul_params"] * tokens
    samples = statistics.mean(r["samples"] for r in records)
    sync_bytes = statistics.median(r["weight_sync_bytes"] for r in records)
    return {"step": median["step"], "samples_per_s": samples / median["step"],
            "phases": {k: median[k] for k in ("generate", "reward", "train", "sync")},
            "train_gflops": flops / median["train"] / 1e9, "threads": threads,
            "sync_gb_per_s": sync_bytes / median["sync"] / 1e9, "memcpy_gb_per_s": memcpy_rate(int(sync_bytes))}


def memcpy_rate(nbytes: int) -> float:
    """GB/s of a plain copy of ``nbytes`` in this process: what the weight hand-off (learner rank 0 writes a
    safetensors file to /dev/shm, each engine reads and loads it) is set against."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return nbytes * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="chorus: '' as configured, 'compiled': learner.compile=true (rollout.compile=true on hf)")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "peers"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "peers.md"))
    args = parser.parse_args()

    from rollout.data import write_jsonl
    from rollout.tiny import ensure_model
    from transformers import AutoTokenizer

    work = Path(args.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    python = trl_python()
    rows = prompt_rows()
    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, rows)
    threads = len(os.sched_getaffinity(0))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "threads": threads, "work": WORK,
                     "models": {}}
    for name in args.models:
        recipe, steps, skip = MODELS[name]
        model_dir = ensure_model("", str(ROOT / recipe))
        facts = model_facts(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_tokens = statistics.mean(len(tok(r["prompt"]).input_ids) for r in rows)
        peak = {p: matmul_peak("bfloat16" if p == "bf16" else "float32", threads, facts["shapes"])
                for p in args.precisions}
        out = results["models"][name] = {"matmul_params": facts["matmul_params"], "steps": steps, "skip": skip,
                                         "peak_gflops": peak, "runs": {}}
        for precision in args.precisions:
            label = f"trl-{precision}"
            print(f"peers: {name} {label}", flush=True)
            out["runs"][label] = run_trl(python, model_dir, prompts, steps, skip, precision == "bf16",
                                         work / f"{name}-{label}.json")
            for backend, variant in ((b, v) for v in args.variants for b in args.backends):
                label = f"chorus-{backend}-{precision}" + (f"-{variant}" if variant else "")
                print(f"peers: {name} {label}", flush=True)
                r = run_chorus(model_dir, backend, [*PRECISIONS[precision], *VARIANTS[variant](backend)], steps, skip,
                               work / f"{name}-{label}", facts, prompt_tokens)
                r["mfu"] = r["train_gflops"] / peak[precision]
                r["vs_trl"] = r["samples_per_s"] / out["runs"][f"trl-{precision}"]["samples_per_s"]
                out["runs"][label] = r
        print(table(results, name), flush=True)
    write(results, Path(args.out))


def _cpu() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    extra = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name}, {len(os.sched_getaffinity(0))} cores" + (f" ({', '.join(extra)})" if extra else "")


def table(results: dict, name: str) -> str:
    m = results["models"][name]
    lines = [f"**{name}** ({m['matmul_params'] / 1e6:.1f}M matmul parameters, median of steps {m['skip'] + 1}-"
             f"{m['steps']}; matmul peak "
             + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in m["peak_gflops"].items()) + ")", "",
             "| run | step (s) | samples/s | vs TRL | phases (s) | learner MFU | weight hand-off vs memcpy | threads |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in m["runs"].items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items() if v is not None)
        vs = f"**{r['vs_trl']:.2f}x**" if "vs_trl" in r else "1.00x"
        mfu = f"{100 * r['mfu']:.0f}% ({r['train_gflops']:.0f} GFLOP/s)" if "mfu" in r else ""
        handoff = (f"{r['sync_gb_per_s']:.2f} vs {r['memcpy_gb_per_s']:.1f} GB/s" if "sync_gb_per_s" in r else "")
        lines.append(f"| {label} | {r['step']:.3f} | {r['samples_per_s']:.0f} | {vs} | {phases} | {mfu} | {handoff} | "
                     f"{r.get('threads', '')} |")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    body = [f"# chorus against TRL's GRPOTrainer ({results['date']})", "",
            f"Machine: {results['cpu']}. Command: `python bench/peers.py` (bench/peers.py says what each run does).",
            "Median step after the warm-up steps; vs TRL compares samples/s with TRL at the same precision. The "
            "weight hand-off is the sync phase (learner rank 0 writes, the engine loads) per byte handed over.", ""]
    for name in results["models"]:
        body += [table(results, name), ""]
    out.write_text("\n".join(body))
    print(f"peers: wrote {out}")


if __name__ == "__main__":
    main()
