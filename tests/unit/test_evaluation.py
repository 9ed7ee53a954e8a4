"""Held-out evaluation (actors/evaluation.py): pass@k, per-set metrics from the engines' completions."""

import math

import pytest

from actors.evaluation import Evaluator, EvalSet, flatten, pass_at_k
from rollout.types import Completion


def test_pass_at_k_by_hand():
    # 1 - C(n - c, k) / C(n, k)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3, 2) = 3, C(5, 2) = 10
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)  # pass@1 is the share correct
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0  # k = n: any sample correct
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))  # 1 - 35/210
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def _engine(answers: dict[str, list[str]], greedy: dict[str, str]):
    """A stand-in for the rollout engines: prompt text -> its completions (the unit under test is the bookkeeping)."""
    calls = []

    def generate(rows, prompts, spec):
        assert ["".join(map(chr, ids)) for ids in prompts] == [r["prompt"] for r in rows]  # the rows of the prompts
        calls.append(spec)
        if spec.temperature:
            assert [len(p) for p in prompts] == [4, 4]  # sampled: the target set's two rows only
        out = []
        for i, ids in enumerate(prompts):
            prompt = "".join(map(chr, ids))
            texts = [greedy[prompt]] if spec.temperature == 0.0 else answers[prompt]
            assert len(texts) == spec.n
            out += [Completion(i, [1] * (len(t) + 1), [0.0] * (len(t) + 1), t, "stop") for t in texts]
        return out[::-1]  # any order: the evaluator sorts by prompt_index

    return generate, calls


def _set(name, rows):
    return EvalSet(name, rows, [[ord(ch) for ch in r["prompt"]] for r in rows])


def test_metrics_per_set():
    sets = [_set("target", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]),
            _set("rev", [{"prompt": "rev ab=", "answer": "ba"}])]
    greedy = {"1+1=": "2", "2+2=": "5", "rev ab=": " ba "}  # exact match strips spaces
    samples = {"1+1=": ["2", "3", "2", "2"], "2+2=": ["5", "4", "6", "7"], "rev ab=": ["ab", "ab", "ab", "ab"]}
    generate, calls = _engine(samples, greedy)
    out = Evaluator(sets, max_new_tokens=4, samples=4, seed=3).run(generate)
    assert out["target"]["accuracy"] == 0.5
    assert out["target"]["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert out["target"]["pass@4"] == 1.0
    assert out["target"]["response_tokens"] == pytest.approx((2 + 2) / 2)  # one character + the stop token each
    assert out["rev"] == {"accuracy": 1.0, "response_tokens": 5.0}  # retention sets: greedy only
    assert calls[0].temperature == 0.0 and calls[1].temperature == 1.0 and calls[1].n == 4
    # every evaluation of a run samples with the same seed, so two differ by the policy alone
    generate2, calls2 = _engine(samples, greedy)
    Evaluator(sets, max_new_tokens=4, samples=4, seed=3).run(generate2)
    assert calls2[1].seed == calls[1].seed
    flat = flatten(out)
    assert flat["eval_accuracy"] == 0.5 and flat["eval/rev/accuracy"] == 1.0 and flat["eval/target/pass@4"] == 1.0
    assert "eval_seconds" in flat


def test_greedy_only_without_samples():
    sets = [_set("target", [{"prompt": "a=", "answer": "b"}])]
    generate, calls = _engine({}, {"a=": "b"})
    out = Evaluator(sets, max_new_tokens=2).run(generate)
    assert out["target"] == {"accuracy": 1.0, "response_tokens": 2.0} and len(calls) == 1


def test_missing_completions_are_an_error():
    sets = [_set("target", [{"prompt": "a=", "answer": "b"}])]
    with pytest.raises(RuntimeError, match="returned 0 completions for 1 rows"):
        Evaluator(sets, max_new_tokens=2).run(lambda rows, prompts, spec: [])
