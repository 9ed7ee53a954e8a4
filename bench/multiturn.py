"""Multi-turn rollout throughput against single-turn generation of the same tokens, on both backends.

    python bench/multiturn.py [--backends hf vllm] [--episodes 64] [--turns 4] [--repeats 5]

The shipped base model answers K two-digit additions in a row ("12+79=" -> "91"): a multi-turn episode of the
`Quiz` environment below gives it the first question as the prompt and each next one as an observation after its
answer (``actors/episodes.py``, the environment in its own process as in training: ``rewards/env_worker.py``). The
single-turn baseline asks the same K x episodes questions as independent prompts in one request: the same answers,
so about the same generated tokens, without the turns. Printed: episodes/s and the model's tokens/s of each, the
environment's share of the multi-turn time, and the ratio. The engines run in this process (no Ray hop to them or
to the environment); the figures are the median of ``--repeats`` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = str(ROOT / "models" / "base")


class Quiz:
    """Asks the row's ``questions`` one after another (the first is the prompt); 1 per right answer."""

    def reset(self, row):
        self.questions, self.answers, self.i = row["questions"], row["answers"], 0

    def step(self, action):
        right = float(action.strip() == self.answers[self.i])
        self.i += 1
        if self.i == len(self.questions):
            return None, right, True
        return self.questions[self.i], right, False


def rows(episodes: int, turns: int, seed: int = 0) -> list[dict]:
    from rollout.tasks import add2

    rng = random.Random(seed)
    out = []
    for _ in range(episodes):
        qa = [add2(rng) for _ in range(turns)]
        out.append({"prompt": qa[0][0], "answer": "", "questions": [q for q, _ in qa], "answers": [a for _, a in qa]})
    return out


def measure(name: str, args) -> dict:
    from transformers import AutoTokenizer

    from actors.episodes import Limits, play
    from rewards.env_worker import EnvWorker
    from rollout.chat import ChatRenderer
    from rollout.engine import BACKENDS
    from rollout.types import SamplingSpec

    tok = AutoTokenizer.from_pretrained(BASE)
    engine = BACKENDS[name](BASE, dtype=args.dtype, seed=0, max_model_len=256, tensor_parallel_size=1, kv_cache_gib=1,
                            gpu_memory_utilization=0.2)
    worker = EnvWorker(f"{Path(__file__).stem}:Quiz" if __name__ == "__main__" else f"{__name__}:Quiz", {},
                       timeout_s=60)
    data = rows(args.episodes, args.turns)
    prompts = [tok(r["prompt"]).input_ids for r in data]
    questions = [tok(q).input_ids for r in data for q in r["questions"]]
    spec = SamplingSpec(n=1, max_new_tokens=8, temperature=1.0, seed=1)
    limits = Limits(max_turns=args.turns, max_tokens=512, max_new_tokens=8, max_model_len=256)
    multi, single, env_share, right = [], [], [], []
    try:
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            episodes = play(engine.generate, worker, data, prompts, spec, ChatRenderer(tok), limits)
            took = time.perf_counter() - t
            generated = sum(sum(c.loss_mask) for c in episodes)
            t = time.perf_counter()
            answers = engine.generate(questions, spec)
            took_single = time.perf_counter() - t
            if i:  # the first call of each warms up
                multi.append((took, generated))
                single.append((took_single, sum(len(c.token_ids) for c in answers)))
                env_share.append(episodes[0].episode["env_seconds"] / took)
                right.append(sum(c.episode["return"] for c in episodes) / (args.episodes * args.turns))
            assert all(c.episode["turns"] == args.turns for c in episodes), "an episode ended early"
    finally:
        worker.shutdown()
        engine.shutdown()
    m_time = statistics.median(t for t, _ in multi)
    s_time = statistics.median(t for t, _ in single)
    return {"backend": name, "multi_s": m_time, "multi_tokens": statistics.median(n for _, n in multi),
            "single_s": s_time, "single_tokens": statistics.median(n for _, n in single),
            "env_share": statistics.median(env_share), "right": statistics.median(right)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(f"{args.episodes} episodes x {args.turns} turns of add2 questions (base model, {args.dtype}), "
          f"against the {args.episodes * args.turns} questions as single-turn prompts in one request")
    print(f"{'backend':<8}{'episodes/s':>12}{'tokens/s':>10}{'env share':>11}{'single q/s':>12}{'tokens/s':>10}"
          f"{'multi/single tokens/s':>23}{'right':>7}")
    for name in args.backends:
        r = measure(name, args)
        multi_tps, single_tps = r["multi_tokens"] / r["multi_s"], r["single_tokens"] / r["single_s"]
        print(f"{name:<8}{args.episodes / r['multi_s']:>12.1f}{multi_tps:>10.0f}{r['env_share']:>10.1%}"
              f"{args.episodes * args.turns / r['single_s']:>12.1f}{single_tps:>10.0f}{multi_tps / single_tps:>22.2f}x"
              f"{r['right']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
