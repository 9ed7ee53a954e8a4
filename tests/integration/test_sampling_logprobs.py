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
