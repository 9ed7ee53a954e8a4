"""Both engines report the behaviour log-probability under the distribution they sampled from (temperature, then
top-p), and the learner's ``learners.sampling.sampling_logprobs`` recomputes it from a plain transformers forward.

One engine per backend for the module (vLLM: ~1 min to start on 2 cores), on the shipped base model in float32."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from learners.losses import token_logprobs
from learners.sampling import nucleus_mask, sampling_logprobs
from rollout.types import SamplingSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BASE = str(Path(__file__).resolve().parents[2] / "models" / "base")
# families where the base is unsure (tests/../models/base/README.md: count 0.57, add3 0.025, sortrep 0.28), so
# that the sampling distribution has several tokens and top-p truncates something
PROMPTS = ["count c:bdaaea=", "431+254=", "sort bdaaea=", "count a:abcdea="]
CASES = [(0.7, 1.0), (0.7, 0.9)]  # (temperature, top_p)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE)


@pytest.fixture(scope="module")
def learner_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["hf", "vllm"])
def engine(request):
    from rollout.engine import BACKENDS

    backend = BACKENDS[request.param](BASE, dtype="float32", seed=0, max_model_len=64, tensor_parallel_size=1,
                                      kv_cache_gib=1, gpu_memory_utilization=0.2)
    backend.name = request.param
    yield backend
    backend.shutdown()


def _learner_logits(model, prompts, completions):
    """Per completion, the learner's ([1, T_i, V] logits predicting its tokens, [1, T_i] tokens): one unpadded
    forward of prompt + response, as a learner scores a row."""
    with torch.no_grad():
        for c in completions:
            prompt = prompts[c.prompt_index]
            logits = model(input_ids=torch.tensor([prompt + c.token_ids])).logits  # [1, L, V]
            yield logits[:, len(prompt) - 1: -1], torch.tensor([c.token_ids])


@pytest.mark.parametrize("temperature,top_p", CASES)
def test_engine_logprobs_are_the_sampling_distributions(engine, learner_model, tokenizer, temperature, top_p):
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    spec = SamplingSpec(n=4, max_new_tokens=8, temperature=temperature, top_p=top_p, seed=1234)
    completions = engine.generate(prompts, spec)
    assert len(completions) == len(PROMPTS) * spec.n
    rows = list(_learner_logits(learner_model, prompts, completions))

    def learner(fn, **kw) -> torch.Tensor:  # [N tokens] over all completions
        return torch.cat([fn(logits, tokens, **kw)[0] for logits, tokens in rows])

    engine_lp = torch.tensor([x for c in completions for x in c.logprobs])  # [N], every sampled token
    sampling_lp = learner(sampling_logprobs, temperature=temperature, top_p=top_p)  # [N]
    raw_lp = learner(token_logprobs)  # [N], temperature 1, no top-p: what the engines returned before
    assert engine_lp.numel() == sampling_lp.numel() >= 2 * len(completions)  # an answer and its end token, at least
    assert torch.isfinite(engine_lp).all() and torch.isfinite(sampling_lp).all()  # sampled tokens are in the nucleus
    worst = float((engine_lp - sampling_lp).abs().max())
    off_raw = float((engine_lp - raw_lp).abs().max())
    print(f"\n{engine.name} T={temperature} top_p={top_p}: {engine_lp.numel()} tokens, "
          f"max |engine - learner| = {worst:.3g}, max |engine - raw T=1| = {off_raw:.3g}", end="")
    assert worst <= 1e-3, worst
    assert off_raw > 0.05, off_raw  # an engine still returning the raw distribution's logprobs fails here
    if top_p < 1:  # and one applying the temperature but not the nucleus fails here
        temperature_only = learner(sampling_logprobs, temperature=temperature, top_p=1.0)
        off_temperature_only = float((engine_lp - temperature_only).abs().max())
        print(f", max |engine - T only| = {off_temperature_only:.3g}", end="")
        assert off_temperature_only > 0.01, off_temperature_only


def test_nucleus_is_vllms_top_p(engine):
    """The learner's nucleus removes the same tokens as the top-p vLLM applies on this platform (the PyTorch
    implementation on a CPU; on a GPU the Triton kernel, same convention by a pivot search)."""
    if engine.name != "vllm":
        pytest.skip("vLLM's own top-p; transformers' is in tests/unit/test_sampling.py")
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    torch.manual_seed(3)
    for top_p in (0.3, 0.8, 0.9, 0.95):
        z = torch.randn(64, 100) * 2  # [N, V]
        masked = apply_top_k_top_p(z.clone(), None, torch.full((64,), top_p))
        removed = masked == -math.inf
        assert removed.any()
        assert torch.equal(nucleus_mask(z, top_p), removed), top_p


def test_multi_turn_episodes_keep_the_engines_logprobs_and_mask_the_observations(engine, learner_model, tokenizer):
    """Episodes of the guessing game on each engine: every token the model generated carries the engine's
    log-probability of it under the sampling distribution, which the learner recomputes over the whole episode (the
    game's answers in between); the game's tokens are masked and carry 0."""
    from actors.episodes import Limits, play
    from rewards.env_worker import EnvWorker
    from rollout.chat import ChatRenderer

    rows = [{"prompt": p, "answer": "", "secret": 500} for p in PROMPTS]
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    spec = SamplingSpec(n=2, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=99)
    worker = EnvWorker("guess", {"low": 0, "high": 999, "max_guesses": 3}, timeout_s=30)
    try:
        episodes = play(engine.generate, worker, rows, prompts, spec, ChatRenderer(tokenizer), Limits(3, 48, 8, 64))
    finally:
        worker.shutdown()
    assert len(episodes) == len(PROMPTS) * 2
    assert max(c.episode["turns"] for c in episodes) >= 2 and all(not c.episode["error"] for c in episodes)
    assert any(0 in c.loss_mask for c in episodes)  # observations inside the responses
    worst = 0.0
    for c in episodes:
        prompt = prompts[c.prompt_index]
        with torch.no_grad():
            logits = learner_model(input_ids=torch.tensor([prompt + c.token_ids])).logits[:, len(prompt) - 1: -1]
        learner = sampling_logprobs(logits, torch.tensor([c.token_ids]), temperature=0.7, top_p=0.9)[0]  # [T]
        mask = torch.tensor(c.loss_mask, dtype=torch.bool)
        engine_lp = torch.tensor(c.logprobs)
        assert torch.all(engine_lp[~mask] == 0.0)
        words = tokenizer.decode([t for t, m in zip(c.token_ids, c.loss_mask) if not m])
        assert words and set(words.replace("higher", "").replace("lower", "").replace("say a number", "")) == set()
        worst = max(worst, float((engine_lp[mask] - learner[mask]).abs().max()))
    print(f"\n{engine.name} multi-turn: max |engine - learner| over the model's tokens = {worst:.3g}", end="")
    assert worst <= 1e-3, worst
