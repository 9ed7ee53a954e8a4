"""A hostile sample fails alone and fast (issue 13, item 5): every built-in reward of rules.py, structured.py and
judge.py scores a batch that mixes hostile responses (100k characters of one kind, 5000-digit numbers, JSON nested
100k deep, lone surrogates) with honest ones; the honest rows keep the exact scores they get alone, the hostile
ones score 0 (what the rule says of them), and the batch finishes in bounded time. Then the same through the reward
actor and its reward processes, as training scores."""

from __future__ import annotations

import math
import time

import pytest

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor
from rewards.judge import DEFAULT_PATTERN, compile_pattern, parse_verdict
from rewards.rules import char_match, choice, exact_match, length_penalty
from rewards.structured import json_schema

pytestmark = pytest.mark.timeout(120)

HERE = __name__
BOUND_S = 5.0  # a hang guard, not a speed test: each batch below takes well under a second

# 100k-character floods of what the regexes and parsers look for: "Answer" followed by 100k spaces took minutes in
# choice's "answer: X" pattern; 14k "```json" a second in json_schema's fence pattern
FLOODS = ["\n" * 20_000, " " * 100_000, "(" * 50_000, "{" * 50_000, "[" * 50_000, "answer: " * 20_000,
          "1234567890" * 10_000, "Answer" + " " * 100_000, "answer:" + "\n" * 20_000, "answer is" * 11_000,
          "Answer: (" * 11_000, "```json" * 14_000, "```json\n" * 12_000, "`" * 100_000, "Score: " * 14_000,
          "A" * 100_000, '"' * 100_000, "\\" * 100_000, "Answer: C \ud800" * 10_000]
HOSTILE_JSON = [
    '{"n": ' + "1" * 5000 + "}",  # past Python's int digits limit (ValueError)
    '{"n": ' + "1" * 4000 + "}",  # parses, but overflows a float comparison
    '{"n": 1e999}', '{"n": NaN}', '{"n": -Infinity}',  # multipleOf: OverflowError / ValueError
    "[" * 50_000 + "]" * 50_000,  # deeper than json's C parser goes (RecursionError)
    '{"n": ' * 100 + "2" + "}" * 100,  # parses, deeper than MAX_DEPTH
    '{"n": 2, "s": "\ud800"}',  # a lone surrogate in a string value
]
HOSTILE = FLOODS + HOSTILE_JSON


def mixed(honest: list[str], hostile: list[str]) -> tuple[list[str], list[int]]:
    """Honest and hostile responses interleaved; the positions of the honest ones."""
    out, where = [], []
    for i in range(max(len(honest), len(hostile))):
        if i < len(honest):
            where.append(len(out))
            out.append(honest[i])
        if i < len(hostile):
            out.append(hostile[i])
    return out, where


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    assert seconds < BOUND_S, f"{getattr(fn, '__name__', fn)} took {seconds:.1f}s"
    return out


def score_of(s) -> float:
    return s["score"] if isinstance(s, dict) else s


@pytest.mark.parametrize("reward, honest, answer, args, hostile", [
    (exact_match, ["B", " b ", "C"], "B", {"lowercase": True, "collapse_spaces": True}, HOSTILE),
    (char_match, ["B", "Bx", "C"], "B", {}, HOSTILE),
    (choice, ["Answer: B", "b", "the answer is (c)", "A or B"], "B", {}, HOSTILE),
    (choice, ["negative", "It reads as negative.", "positive", "positive or negative"], "negative",
     {"labels": ["positive", "negative", "very negative"]}, HOSTILE),
    (length_penalty, ["a" * 10, "a" * 300, "a" * 500], None, {"unit": "chars"}, FLOODS),  # all over the limit
])
def test_rule_rewards_score_hostile_rows_zero_and_keep_the_honest_scores(reward, honest, answer, args, hostile):
    responses, where = mixed(honest, hostile)
    fields = {} if answer is None else {"answer": [answer] * len(responses)}
    alone = reward(["q"] * len(honest), honest, **({} if answer is None else {"answer": [answer] * len(honest)}),
                   **args)
    scores = timed(reward, ["q"] * len(responses), responses, **fields, **args)
    assert [scores[i] for i in where] == alone and 1.0 in alone  # honest rows: exactly what they score alone
    assert [s for i, s in enumerate(scores) if i not in where] == [0.0] * len(hostile)


def test_json_schema_scores_hostile_rows_zero_as_unparsed_and_keeps_the_honest_scores():
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "number", "multipleOf": 0.5}}}
    honest = ['{"n": 2}', 'Here: ```json\n{"n": 3}\n```', '{"m": 2}', "no json"]
    responses, where = mixed(honest, HOSTILE)
    alone = json_schema(["q"] * 4, honest, schema=[schema] * 4, answer=[{"n": 2}] * 4)
    # all right: 1.0; n wrong: parses .1 + schema .3 + keys .2 = 0.6; n missing: parses .1 = 0.1; no JSON: 0
    assert [s["score"] for s in alone] == pytest.approx([1.0, 0.6, 0.1, 0.0], abs=1e-12)
    scores = timed(json_schema, ["q"] * len(responses), responses, schema=[schema] * len(responses),
                   answer=[{"n": 2}] * len(responses))
    assert [scores[i] for i in where] == alone
    hostile = [s for i, s in enumerate(scores) if i not in where]
    invalid = {"score": 0.0, "parses": 0.0, "schema": 0.0, "keys": 0.0, "content": 0.0}
    assert hostile[:-1] == [invalid] * (len(HOSTILE) - 1)  # every flood and hostile number or nesting
    assert hostile[-1]["score"] == 1.0  # a lone surrogate in a string value: valid JSON, and n is right


def test_json_schema_a_value_that_breaks_the_validator_scores_zero_alone():
    """Depth 64 is allowed, but a schema that recurses through nine keywords per level exhausts Python's stack on
    it: that response scores 0, the others of its batch are scored."""
    inner = {"type": "array", "items": {"$ref": "#"}}
    for _ in range(8):
        inner = {"allOf": [inner]}
    schema = {"anyOf": [inner, {"type": "integer"}]}
    responses = ["[[1]]", "[" * 64 + "1" + "]" * 64, "[[[2]]]"]
    scores = timed(json_schema, ["q"] * 3, responses, schema=[schema] * 3)
    assert [s["score"] for s in scores] == [1.0, 0.0, 1.0]


def test_judge_verdict_parsing_is_bounded_on_hostile_verdicts():
    """The judge parses its own model's output (max_new_tokens long), but a long or odd one must not hang it."""
    pattern = compile_pattern(DEFAULT_PATTERN)
    honest = {"Score: 7": 0.7, "Reasoning...\nScore: 10": 1.0}
    for verdict, score in honest.items():
        assert parse_verdict(verdict, pattern, 0, 10) == pytest.approx(score, abs=1e-12)
    start = time.perf_counter()
    for flood in FLOODS + ["Score:" + " " * 100_000 + "x", "Score: " + "9" * 100_000]:
        assert parse_verdict(flood, pattern, 0, 10) is None  # none, several, or out of range
    assert parse_verdict("Score: 1." + "1" * 100_000, pattern, 0, 10) == pytest.approx(1.1111111 / 10)
    assert time.perf_counter() - start < BOUND_S


def encodes(prompts, responses, **_):
    """What a tokenizer does: refuse text that is not valid Unicode (a lone surrogate)."""
    return [float(len(r.encode("utf-8")) > 0) for r in responses]


def test_the_reward_actor_scores_a_mixed_batch_through_the_reward_processes():
    rules = [RewardFnConfig(name="exact_match", args={"lowercase": True}), RewardFnConfig(name="char_match"),
             RewardFnConfig(name="choice"),
             RewardFnConfig(name="length_penalty", args={"unit": "chars", "target": 10, "limit": 20}),
             RewardFnConfig(name=f"{HERE}:encodes", isolation="thread")]  # the judge's path: no msgpack
    honest = ["B", "Answer: B", "C", "b", "B\ud800"]  # the last: a lone surrogate, replaced before the reward sees it
    responses, where = mixed(honest, FLOODS)
    rows = [{"prompt": "q", "answer": "B"} for _ in responses]
    actor = RewardActor(RewardConfig(functions=rules, timeout_s=30.0, fallback=-1.0))
    try:
        scored, _ = timed(actor.score, ["q"] * len(responses), responses, rows)
    finally:
        actor.shutdown()
    assert not any(s.failed for s in scored)  # no batch failed, no item either
    names = ["exact_match", "char_match", "choice", "length_penalty", f"{HERE}:encodes"]
    by_name = {n: [s.components[n] for s in scored] for n in names}
    assert [by_name["exact_match"][i] for i in where] == [1.0, 0.0, 0.0, 1.0, 0.0]  # "B\ufffd" is not "B"
    assert [by_name["char_match"][i] for i in where] == [1.0, 0.0, 0.0, 0.0, 1.0]  # case-sensitive
    assert [by_name["choice"][i] for i in where] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert [by_name["length_penalty"][i] for i in where] == [1.0] * 5
    hostile = [i for i in range(len(responses)) if i not in where]
    for n in ["exact_match", "char_match", "choice", "length_penalty"]:
        assert [by_name[n][i] for i in hostile] == [0.0] * len(hostile), n
    assert by_name[f"{HERE}:encodes"] == [1.0] * len(responses)  # a thread reward also got encodable text
    assert all(math.isfinite(s.total) for s in scored)


def test_the_reward_actor_scores_hostile_json_alone():
    honest = ['{"n": 2}', '{"n": 3}']
    responses, where = mixed(honest, HOSTILE)
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "number", "multipleOf": 0.5}}}
    rows = [{"prompt": "q", "schema": schema, "answer": {"n": 2}} for _ in responses]
    actor = RewardActor(RewardConfig(functions=[RewardFnConfig(name="json_schema")], timeout_s=30.0, fallback=-1.0))
    try:
        scored, _ = timed(actor.score, ["q"] * len(responses), responses, rows)
    finally:
        actor.shutdown()
    assert not any(s.failed for s in scored)
    assert [scored[i].total for i in where] == pytest.approx([1.0, 0.6], abs=1e-12)
    hostile = [scored[i].components["json_schema.parses"] for i in range(len(responses)) if i not in where]
    assert hostile == [0.0] * (len(HOSTILE) - 1) + [1.0]  # the string with a surrogate is valid JSON
