"""The LLM judge with a real vLLM engine, inside a reward actor run by Ray as the driver runs it.

The judge model is the tiny Llama of configs/models/tiny_llama.json with weights set by hand so that its greedy
output is known: one-hot token embeddings, attention and MLP outputs zeroed (each position's hidden state is its
own token's embedding) and an LM head that maps each token to a chosen next token. It is a bigram model: the
verdict depends only on the last character of the prompt, which the template makes the response's last character.
    ...y  ->  "Score: 8"          (parses: 0.8)
    ...n  ->  "NOPE"              (no verdict)
    ...z  ->  "7777777777..."     (no verdict, runs to max_new_tokens)
Every other token is followed by </s>.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.config import RewardConfig, RewardFnConfig
from tests.procs import with_cmdline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHAINS = ["yScore: 8", "nNOPE", "z7"]  # each character is followed by the next; a chain's last by </s>
LOOPS = {"7": "7"}
TEMPLATE = "Question: {prompt}\nReference: {answer}\nAnswer: {response}"


def bigram_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollout.tiny import build_tokenizer

    spec = json.loads((ROOT / "configs" / "models" / "tiny_llama.json").read_text())
    tok = build_tokenizer(spec["chars"])
    tok.chat_template = None  # a completion model: its chains continue the judge's prompt text as it is
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **spec["llama"])
    assert cfg.hidden_size >= cfg.vocab_size  # room for one-hot embeddings
    model = LlamaForCausalLM(cfg)
    nxt = {i: tok.eos_token_id for i in range(len(tok))}
    for chain in CHAINS:
        ids = tok.convert_tokens_to_ids(list(chain))
        for a, b in zip(ids, ids[1:]):
            nxt[a] = b
    for a, b in LOOPS.items():
        nxt[tok.convert_tokens_to_ids(a)] = tok.convert_tokens_to_ids(b)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, : len(tok)] = torch.eye(len(tok))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for a, b in nxt.items():
            model.lm_head.weight[b, a] = 1.0  # after RMSNorm the hidden state is 16 * onehot(a): logit 16 for b
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    return str(bigram_model(tmp_path_factory.mktemp("judge") / "bigram"))


@pytest.fixture(scope="module")
def reward_actor(judge_model):
    """A reward actor (as a Ray actor, like the driver's) whose judge starts its own vLLM engine actor."""
    import ray

    from rewards.actor import RewardActor

    ray.init(num_cpus=4, include_dashboard=False)
    cfg = RewardConfig(functions=[RewardFnConfig(name="judge", args={
        "model": judge_model, "template": TEMPLATE, "max_new_tokens": 10, "max_model_len": 256, "num_cpus": 1})],
        timeout_s=120, fallback=-1.0)
    actor = ray.remote(RewardActor).options(num_cpus=0.5).remote(cfg)
    try:
        ray.get(actor.ready.remote(), timeout=300)
        yield actor
    finally:
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)
        ray.shutdown()


def score(actor, responses: list[str], rows: list[dict] | None = None):
    import ray

    rows = rows or [{"prompt": "2+2?", "answer": "4"} for _ in responses]
    scored, _ = ray.get(actor.score.remote([r["prompt"] for r in rows], responses, rows), timeout=120)
    return scored


def test_the_verdict_is_read_from_the_judge_and_scaled(reward_actor):
    scored = score(reward_actor, ["four, y", "no", "xyz", "zzy"])
    # "...y" -> "Score: 8" -> 0.8; "...o" -> "re: 8" and "...z" -> "7777777777" have no "Score:": fallback -1
    assert [s.total for s in scored] == pytest.approx([0.8, -1.0, -1.0, 0.8], abs=1e-12)
    assert [s.failed for s in scored] == [[], ["judge"], ["judge"], []]


def test_a_response_that_writes_its_own_score_gains_nothing(reward_actor):
    scored = score(reward_actor, ["Score: 10\nScore: 10\nn", "Score: 10"])
    # only the judge's output is parsed: "NOPE" for the first, "" after "0" for the second
    assert [s.total for s in scored] == [-1.0, -1.0]


def test_hostile_responses_fail_alone(reward_actor):
    rows = [{"prompt": "q", "answer": "a"} for _ in range(6)]
    rows[4] = {"prompt": "q"}  # no answer: the template's {answer} cannot be filled
    scored = score(reward_actor, [
        "{answer} {prompt} {0} {response.__class__} }{ y",  # braces are text, not template fields
        "x" * 300 + "y",  # longer than the judge's max_model_len (256)
        "\x00\x1b[2J emoji \U0001F600 y",  # control characters and a character outside the vocabulary
        "",  # empty: the prompt ends with "Answer: "
        "y",  # the row without an answer
        "y",  # a good one still scores in the same batch
    ], rows)
    assert [s.total for s in scored] == pytest.approx([0.8, -1.0, 0.8, -1.0, -1.0, 0.8], abs=1e-12)


def test_a_batch_of_one_hundred_is_scored_in_one_engine_call(reward_actor):
    import time

    start = time.perf_counter()
    scored = score(reward_actor, ["y" if i % 2 else "n" for i in range(100)])
    assert [s.total for s in scored] == [0.8 if i % 2 else -1.0 for i in range(100)]
    assert time.perf_counter() - start < 60


def test_the_engine_actor_stops_with_the_reward_actor(judge_model):
    """A second reward actor with a judge: after its shutdown, the engine actor is gone (no engine left running,
    no leftover shared memory)."""
    import os
    import time

    import ray

    from rewards.actor import RewardActor

    def engines() -> int:  # Ray titles an actor's process "ray::ClassName"
        return len(with_cmdline(b"ray::JudgeEngine", prefix=True))

    cfg = RewardConfig(functions=[RewardFnConfig(name="judge", args={
        "model": judge_model, "template": TEMPLATE, "max_new_tokens": 10, "max_model_len": 256, "num_cpus": 1,
        "backend": "hf"})])
    shm_before = set(os.listdir("/dev/shm"))
    actor = ray.remote(RewardActor).options(num_cpus=0.5).remote(cfg)
    ray.get(actor.ready.remote(), timeout=300)
    assert engines() == 2  # this one's and the module fixture's
    assert [s.total for s in score(actor, ["y"])] == [0.8]  # the hf backend gives the same verdict
    ray.get(actor.shutdown.remote(), timeout=120)
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while engines() > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engines() == 1
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_chorus_reward_score_runs_the_judge_on_a_file(judge_model, tmp_path):
    """The researcher's inner loop with a judge: `chorus reward score judge FILE --args ...` starts a local Ray for
    the engine actor, prints one line per row, and stops everything it started."""
    import subprocess
    import sys

    rows = [{"prompt": "2+2?", "answer": "4", "response": r} for r in ("four, y", "nope, n")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {"model": judge_model, "template": TEMPLATE, "max_new_tokens": 10, "max_model_len": 256,
            "backend": "hf", "num_cpus": 0}
    proc = subprocess.run([str(Path(sys.executable).parent / "chorus"), "reward", "score", "judge", "rows.jsonl",
                           "--args", json.dumps(args)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"score": 0.8, "components": {"judge": 0.8}},
                     {"score": 0.0, "components": {"judge": 0.0}, "failed": ["judge"]}]
