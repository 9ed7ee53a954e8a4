"""rollout/engine.py HFBackend's decode loop on the shipped base model in float32: greedy output is transformers'
greedy ``generate``; each sampled row's log-probabilities are those of a plain unpadded forward of prompt + response
(the prompt prefilled once for its n samples, finished rows leaving the batch); sampled tokens follow the reported
distribution; a seed fixes the samples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from learners.sampling import nucleus_mask, sampling_logprobs
from rollout.types import SamplingSpec

BASE = str(Path(__file__).resolve().parents[2] / "models" / "base")
# prompts of different lengths (left padding) and families the base is sure of and unsure of (models/base/README.md),
# so that some samples end early and others run to the token limit
PROMPTS = ["41+19=", "count c:bdaaea=", "431+254=", "sort bdaaea=", "rev emubc="]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def backend():
    from rollout.engine import HFBackend

    return HFBackend(BASE, dtype="float32", seed=0)


@pytest.fixture(scope="module")
def prompts(backend):
    return [backend.tokenizer(p).input_ids for p in PROMPTS]


def test_greedy_is_transformers_greedy_generate(backend, prompts):
    tok = backend.tokenizer
    completions = backend.generate(prompts, SamplingSpec(n=1, temperature=0, max_new_tokens=12))
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(-1)).long()
    with torch.no_grad():
        expected = backend.model.generate(input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=12,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, width:]
    for row, c in enumerate(completions):
        assert c.token_ids == expected[row, : len(c.token_ids)].tolist(), (PROMPTS[row], c.token_ids)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
        assert tok.eos_token_id not in c.token_ids[:-1]
    assert {c.finish_reason for c in completions} == {"stop"}  # the base ends its answers


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_are_an_unpadded_forwards(backend, prompts, temperature, top_p):
    spec = SamplingSpec(n=6, temperature=temperature, top_p=top_p, max_new_tokens=5, seed=3)
    completions = backend.generate(prompts, spec)
    assert len(completions) == len(prompts) * spec.n
    assert [c.prompt_index for c in completions] == [i for i in range(len(prompts)) for _ in range(spec.n)]
    lengths = {len(c.token_ids) for c in completions}
    assert min(lengths) < spec.max_new_tokens and spec.max_new_tokens in lengths  # rows left the batch, others ran on
    with torch.no_grad():
        for c in completions:
            prompt = prompts[c.prompt_index]
            logits = backend.model(input_ids=torch.tensor([prompt + c.token_ids])).logits[:, len(prompt) - 1: -1]
            expected = sampling_logprobs(logits, torch.tensor([c.token_ids]), temperature=temperature, top_p=top_p)
            torch.testing.assert_close(torch.tensor([c.logprobs]), expected, atol=2e-5, rtol=0)


def test_samples_follow_the_reported_distribution(backend, prompts):
    """The first token of 4000 samples of one prompt, against the distribution the backend reports; at top_p 0.9
    nothing outside the nucleus is drawn. The base is unsure here: at temperature 0.7 the answer "1" has mass 0.58,
    "2" 0.33 (the nucleus) and "0" 0.09, which a sampler ignoring top-p would draw about 340 times."""
    prompt = backend.tokenizer("count a:abcdea=").input_ids
    with torch.no_grad():
        z = backend.model(input_ids=torch.tensor([prompt])).logits[0, -1] / 0.7  # [V]
    removed = nucleus_mask(z.unsqueeze(0), 0.9)[0]
    probs = z.masked_fill(removed, -math.inf).softmax(-1)
    assert (probs > 0.05).sum() == 2 and (z.softmax(-1)[removed] > 0.05).any()  # a distribution worth checking
    draws = backend.generate([prompt], SamplingSpec(n=4000, temperature=0.7, top_p=0.9, max_new_tokens=1, seed=11))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in draws]), minlength=len(z)).float()
    assert counts[removed].sum() == 0
    # each token's frequency within 4 standard errors of its probability
    se = (probs * (1 - probs) / 4000).sqrt()
    assert ((counts / 4000 - probs).abs() <= 4 * se + 1e-9).all(), (counts[probs > 0] / 4000, probs[probs > 0])
    for c in draws[:50]:
        assert c.logprobs[0] == pytest.approx(math.log(probs[c.token_ids[0]]), abs=1e-5)


def test_a_seed_fixes_the_samples(backend, prompts):
    spec = SamplingSpec(n=4, temperature=1.0, max_new_tokens=8, seed=5)
    first, again = backend.generate(prompts, spec), backend.generate(prompts, spec)
    other = backend.generate(prompts, SamplingSpec(n=4, temperature=1.0, max_new_tokens=8, seed=6))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


@pytest.mark.timeout(600)
def test_compiled_model_samples_what_the_eager_one_does(backend, prompts):
    """``rollout.compile``: the same tokens and log-probabilities as eager, over calls of other prompt widths and
    batch sizes than the first (dynamic shapes, not a graph per shape)."""
    from rollout.engine import HFBackend

    compiled = HFBackend(BASE, dtype="float32", seed=0, compile=True)
    assert getattr(compiled.model, "_compiled_call_impl", None) is not None
    for subset, n in ((prompts, 4), (prompts[:2], 3), (prompts[2:], 5)):
        spec = SamplingSpec(n=n, temperature=0.7, top_p=0.9, max_new_tokens=6, seed=21)
        eager, fast = backend.generate(subset, spec), compiled.generate(subset, spec)
        assert [c.token_ids for c in fast] == [c.token_ids for c in eager]
        worst = max(abs(a - b) for c, d in zip(fast, eager) for a, b in zip(c.logprobs, d.logprobs))
        assert worst < 1e-4, worst
