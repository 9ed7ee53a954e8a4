"""vLLM vs transformers-generate throughput on the 1.4M from-scratch model, through chorus's own backends.

    .venv/bin/python bench/generation.py [--reps 5]

Prints one row per (backend, shape): prompts x samples, new tokens, seconds per call, samples/s, tokens/s.
Sampling at temperature 1 with 8 new tokens at most, as the from-scratch quickstart does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the from-scratch quickstart's actors use 1)")
    args = parser.parse_args()

    import torch

    from rollout.data import make_synthetic
    from rollout.engine import HFBackend, VLLMBackend
    from rollout.tiny import ensure_model
    from rollout.types import SamplingSpec

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    path = ensure_model("", str(ROOT / "configs/models/tiny_llama.json"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rows = make_synthetic("reverse", 0, "abcdef", 3, 5, 512, 0, 10)["prompts"]
    shapes = [(8, 8), (64, 8)]  # (prompts, samples each): a from-scratch quickstart step, and more
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}")
    print(f"{'backend':8} {'shape':>8} {'tokens':>7} {'s/call':>8} {'samples/s':>10} {'tokens/s':>9}")
    for name, cls in (("hf", HFBackend), ("vllm", VLLMBackend)):
        t0 = time.perf_counter()
        backend = cls(path, dtype="float32", seed=0, max_model_len=256, tensor_parallel_size=1, kv_cache_gib=1,
                      gpu_memory_utilization=0.5)
        print(f"# {name}: started in {time.perf_counter() - t0:.1f}s")
        for prompts, n in shapes:
            ids = [tok(r["prompt"]).input_ids for r in rows[:prompts]]
            spec = SamplingSpec(n=n, max_new_tokens=8, temperature=1.0)
            backend.generate(ids, spec)  # warm-up
            times, tokens = [], 0
            for _ in range(args.reps):
                t = time.perf_counter()
                out = backend.generate(ids, spec)
                times.append(time.perf_counter() - t)
                tokens = sum(len(c.token_ids) for c in out)
            sec = statistics.median(times)
            print(f"{name:8} {f'{prompts}x{n}':>8} {tokens:>7} {sec:>8.3f} {prompts * n / sec:>10.0f} {tokens / sec:>9.0f}",
                  flush=True)
        del backend


if __name__ == "__main__":
    main()
