"""The real stack on the tiny model: Ray + vLLM + DeepSpeed in one shared Trainer (configs/smoke.yaml).

Tests run in file order on one module-scoped trainer: logprob agreement at step 0, after a weight sync, then the
smoke run itself (learning, metrics endpoint, run directory, final model)."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from pathlib import Path

import pytest

from actors.config import load_config
from learners.batch import TrainBatch
from rollout.types import SamplingSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]

# Documented in the README's metrics table; every one must be on the endpoint.
METRIC_NAMES = [
    "chorus_step", "chorus_samples_generated_total", "chorus_tokens_generated_total", "chorus_expert_rows_total",
    "chorus_reward_mean", "chorus_loss", "chorus_mu", "chorus_kl", "chorus_entropy", "chorus_clip_fraction",
    "chorus_grad_norm", "chorus_learning_rate", "chorus_response_length_tokens", "chorus_eval_accuracy",
    "chorus_step_phase_seconds", "chorus_phase_seconds_total", "chorus_step_seconds", "chorus_queue_depth",
    "chorus_actor_restarts_total", "chorus_reward_failures_total", "chorus_reward_dropped_groups_total",
    "chorus_weight_sync_bytes_total", "chorus_weight_sync_seconds", "chorus_data_rows_skipped_total",
    "chorus_dual_clip_fraction", "chorus_mismatch_kl", "chorus_is_ratio_mean", "chorus_is_weight_mean",
    "chorus_is_outside_fraction", "chorus_filtered_groups_total", "chorus_sample_rounds",
    "chorus_truncated_responses_total",
]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from actors.driver import Trainer

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    shm_before = set(os.listdir("/dev/shm"))
    t = Trainer(cfg, tmp_path_factory.mktemp("smoke"))
    t.shm_before = shm_before
    yield t
    t.close()


def _engine_vs_learner(trainer, prompts: list[list[int]]) -> tuple[float, int]:
    """Sample with the engine, recompute with the learner; max |difference| of the sampled tokens' logprobs."""
    completions = trainer.maker.sample(prompts, SamplingSpec(n=4, max_new_tokens=8, temperature=1.0))
    batch = TrainBatch(
        input_ids=[prompts[c.prompt_index] + c.token_ids for c in completions],
        prompt_lens=[len(prompts[c.prompt_index]) for c in completions],
        old_logprobs=[c.logprobs for c in completions],
        advantages=[[0.0] * len(c.token_ids) for c in completions], is_expert=[False] * len(completions),
    )
    learner = trainer.learners.all(lambda a: a.logprobs.remote(batch))[0]
    diffs = [abs(a - b) for c, lp in zip(completions, learner) for a, b in zip(c.logprobs, lp)]
    assert len(diffs) == sum(len(c.token_ids) for c in completions)
    return max(diffs), len(diffs)


def test_step0_engine_logprobs_equal_learner_logprobs(trainer):
    worst, n = _engine_vs_learner(trainer, trainer.prompt_ids[:6])
    assert n >= 24
    assert worst < 1e-3, f"vLLM and learner logprobs differ by {worst} at step 0"


def test_weight_sync_moves_engine_to_learner_weights(trainer):
    before = trainer.rollouts.all(lambda a: a.checksum.remote())[0]
    for step in range(3):  # three optimiser steps, each followed by a sync
        record = trainer.step(trainer.scheduler.plan(step))
        assert record["weight_sync_bytes"] > 1_000_000  # the full float32 model (~5.4 MB)
    after = trainer.rollouts.all(lambda a: a.checksum.remote())[0]
    assert after != pytest.approx(before, abs=1e-3), "engine weights did not change after the sync"
    worst, _ = _engine_vs_learner(trainer, trainer.prompt_ids[10:16])
    assert worst < 1e-3, f"after a sync the engine's logprobs differ from the learner's by {worst}"


def test_smoke_run_learns_and_serves_metrics(trainer):
    scrapes: list[str] = []
    done = threading.Event()

    def scrape():
        while not done.wait(1.0):
            with urllib.request.urlopen(trainer.metrics.url, timeout=5) as r:
                scrapes.append(r.read().decode())

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    # the steps the weight-sync test took are the run's first ones: it goes on from there (a checkpoint must hold
    # as many steps as the learners have taken)
    trainer.start_step = trainer.version
    start_accuracy = trainer.evaluate()["eval_accuracy"]
    summary = trainer.run()
    done.set()
    scraper.join(timeout=10)

    # (c) learning: held-out accuracy and reward rise
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").open()]
    steps = [r for r in records if "reward_mean" in r]
    assert {"step", "reward_mean", "loss", "mu"} <= set(steps[0])
    assert any("eval_accuracy" in r for r in steps), "no periodic evaluation logged"
    early = [r["reward_mean"] for r in steps[3:23] if r["reward_mean"] is not None]
    late = [r["reward_mean"] for r in steps[-20:]]
    assert sum(late) / len(late) > sum(early) / len(early) + 0.2, (early, late)
    assert summary["final_eval_accuracy"] > start_accuracy + 0.3, (start_accuracy, summary)

    # (d) the metrics endpoint, scraped over HTTP while the run was going
    live = [s for s in scrapes if "chorus_step " in s and "chorus_step 0.0" not in s]
    assert live, "no scrape saw a step in progress"
    samples = {re.match(r"[a-z_]+", line).group() for line in live[-1].splitlines() if not line.startswith("#")}
    for name in METRIC_NAMES:
        assert name in samples, f"{name} has no sample on /metrics"
    assert trainer.metrics.host == "127.0.0.1"

    # run directory: the resolved config, the summary, the final model
    assert load_config(trainer.run_dir / "config.yaml") == trainer.cfg
    assert json.loads((trainer.run_dir / "summary.json").read_text())["final_eval_accuracy"] == \
        summary["final_eval_accuracy"]
    assert (trainer.run_dir / "final" / "config.json").is_file()


def test_final_model_loads_in_vllm_and_agrees_with_transformers(trainer):
    """final/ is a plain HF directory: vLLM (a fresh engine, in its own process) and transformers give the same
    greedy answers from it."""
    import subprocess
    import sys

    final = trainer.run_dir / "final"
    prompts = ["abcd=", "fedca=", "bbe="]
    script = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(final)!r}, dtype='float32', enforce_eager=True, max_model_len=64)\n"
        f"    outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)\n"
        "    print('RESULT ' + json.dumps([o.outputs[0].text for o in outs]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    vllm_texts = json.loads(lines[-1][len("RESULT "):])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    hf_texts = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
        hf_texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert vllm_texts == hf_texts


def test_close_leaves_no_shared_memory_behind(trainer):
    """vLLM's engine keeps its queues in /dev/shm and the weight hand-off lives there too: a closed trainer must
    leave none of it (killed without a shutdown, each vLLM engine left ~400 MB behind)."""
    assert trainer.sync_dir.is_dir()
    trainer.close()
    leftovers = set(os.listdir("/dev/shm")) - trainer.shm_before
    assert not leftovers, leftovers
