"""actors/episodes.py with real environments in their own processes (rewards/env_worker.py): a scripted model plays
tool and game episodes; the tokens, the loss mask, the log-probabilities, the returns and every way an episode ends
are checked exactly; environments that raise, answer nonsense, hang or die fail their episodes and the next call
works."""

from __future__ import annotations

import os
import time

import pytest

from actors.episodes import Limits, episode_metrics, play
from rewards.env_worker import EnvWorker
from rewards.envs import GuessNumber, Tools, calculator, check_env_args
from rollout.chat import ChatRenderer
from rollout.tiny import build_tokenizer
from rollout.types import Completion, SamplingSpec

HERE = __name__  # environments below are loaded by this module's name in the env process
CHARS = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\n"
LOGPROB = -0.25  # what the scripted engine says each of its tokens had


class Raiser:
    """Raises on its second step."""

    def reset(self, row):
        self.turns = 0

    def step(self, action):
        self.turns += 1
        if self.turns == 2:
            raise RuntimeError("boom")
        return "again", 0.5, False


class Sleeper:
    def reset(self, row):
        pass

    def step(self, action):
        if action == "sleep":
            time.sleep(60)
        return None, 1.0, True


class Nonsense:
    def reset(self, row):
        pass

    def step(self, action):
        return "x", float("nan"), False


class Dies:
    def reset(self, row):
        pass

    def step(self, action):
        os._exit(3)


class Greeter:
    """Speaks first: its reset observation goes before the model's first turn."""

    role = "user"

    def reset(self, row):
        return "hello"

    def step(self, action):
        return None, float(action == "hi"), True


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CHARS)


def scripted(tok, policy):
    """An engine whose turn is ``policy(context text) -> turn text``, with its end token (cut at max_new_tokens
    without it); records each request."""
    requests = []

    def generate(prompts, spec):
        requests.append((len(prompts), spec))
        out = []
        for i, ids in enumerate(prompts):
            for _ in range(spec.n):
                turn = tok(policy(tok.decode(ids, skip_special_tokens=False)), add_special_tokens=False).input_ids
                turn = turn + [tok.eos_token_id]
                finish = "stop" if len(turn) <= spec.max_new_tokens else "length"
                turn = turn[: spec.max_new_tokens]
                text = tok.decode(turn, skip_special_tokens=True)
                out.append(Completion(i, turn, [LOGPROB] * len(turn), text, finish))
        return out

    generate.requests = requests
    return generate


def calc_policy(context: str) -> str:
    """Calls the calculator on the question, then answers with what it said."""
    if context.endswith("T:632\nA:"):
        return "632"
    return "<calc>347+285</calc>"


CHAT_ROW = {"messages": [{"role": "user", "content": "347+285="}], "answer": "632"}


def chat_prompt(tok, row=CHAT_ROW):
    return ChatRenderer(tok).prompt(row)[1]


def run(tok, env, policy, rows, prompts, *, n=1, limits=Limits(4, 256, 32, 256), args=None, timeout_s=5.0):
    worker = EnvWorker(env, args or {}, timeout_s=timeout_s)
    try:
        spec = SamplingSpec(n=n, max_new_tokens=limits.max_new_tokens, temperature=1.0, seed=7)
        return play(scripted(tok, policy), worker, rows, prompts, spec, ChatRenderer(tok), limits), worker
    finally:
        worker.shutdown()


def test_a_tool_episode_masks_the_tool_turn_and_keeps_the_engine_logprobs(tok):
    [c], _ = run(tok, "tools", calc_policy, [CHAT_ROW], [chat_prompt(tok)])
    text = tok.decode(c.token_ids, skip_special_tokens=False)
    assert text == "<calc>347+285</calc></s>T:632\nA:632</s>"
    assert c.loss_mask == [1] * 21 + [0] * 8 + [1] * 4  # the call and its end token; "T:632\nA:"; "632" and </s>
    assert c.logprobs == [LOGPROB] * 21 + [0.0] * 8 + [LOGPROB] * 4
    assert (c.text, c.finish_reason) == ("632", "stop")
    e = c.episode
    assert (e["turns"], e["return"], e["rewards"], e["error"]) == (2, 1.0, [0.0, 1.0], "")
    assert e["info"] == {"tool_calls": 1.0, "tool_errors": 0.0} and e["env_calls"] == 3  # reset and two steps
    assert "prompt_ids" not in e  # the tools speak only when called


def test_a_wrong_answer_and_a_failing_tool(tok):
    def policy(context):
        return "<calc>1/0</calc>" if context.endswith("=\nA:") else "7"

    [c], _ = run(tok, "tools", policy, [CHAT_ROW], [chat_prompt(tok)])
    assert tok.decode(c.token_ids, skip_special_tokens=False) == \
        "<calc>1/0</calc></s>T:error: ZeroDivisionError: division by zero\nA:7</s>"
    assert c.episode["return"] == 0.0 and c.episode["info"] == {"tool_calls": 1.0, "tool_errors": 1.0}


def test_the_turn_limit_ends_an_episode_and_its_environment(tok):
    [c], worker = run(tok, "tools", lambda ctx: "<calc>1+1</calc>", [CHAT_ROW], [chat_prompt(tok)],
                      limits=Limits(3, 256, 32, 256))
    assert c.finish_reason == "turns" and c.episode["turns"] == 3 and c.episode["info"]["tool_calls"] == 3
    assert sum(c.loss_mask) == 3 * 17  # three calls of 16 characters and their end tokens


def test_a_turn_without_its_end_token_ends_the_episode(tok):
    [c], _ = run(tok, "tools", calc_policy, [CHAT_ROW], [chat_prompt(tok)], limits=Limits(4, 256, 10, 256))
    assert c.finish_reason == "length" and c.episode["turns"] == 1 and c.episode["rewards"] == []
    assert c.token_ids == tok("<calc>347+", add_special_tokens=False).input_ids


def test_the_token_budget_leaves_out_an_observation_that_does_not_fit(tok):
    # the call takes 21 tokens; "T:632\nA:" 8 more would leave none to answer in a budget of 29
    [c], _ = run(tok, "tools", calc_policy, [CHAT_ROW], [chat_prompt(tok)], limits=Limits(4, 29, 32, 256))
    assert c.finish_reason == "length" and len(c.token_ids) == 21 and c.episode["rewards"] == [0.0]
    # the engine's context: the prompt (12) and 21 + 8 tokens need room for one more
    [c], _ = run(tok, "tools", calc_policy, [CHAT_ROW], [chat_prompt(tok)], limits=Limits(4, 256, 32, 42))
    assert c.finish_reason == "length" and len(c.token_ids) == 21
    # a turn never asks for more than the budget left: 30 - 29 = 1 token for the answer, cut short
    [c], _ = run(tok, "tools", calc_policy, [CHAT_ROW], [chat_prompt(tok)], limits=Limits(4, 30, 32, 256))
    assert c.finish_reason == "length" and len(c.token_ids) == 30 and c.loss_mask[-1] == 1


def test_groups_share_the_first_request_and_then_go_one_by_one(tok):
    rows = [CHAT_ROW, {"messages": [{"role": "user", "content": "1+2="}], "answer": "3"}]
    worker = EnvWorker("tools", {}, timeout_s=5)
    generate = scripted(tok, calc_policy)
    try:
        out = play(generate, worker, rows, [chat_prompt(tok, r) for r in rows],
                   SamplingSpec(n=3, max_new_tokens=32, temperature=1.0, seed=1), ChatRenderer(tok),
                   Limits(4, 256, 32, 256))
    finally:
        worker.shutdown()
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert [c.episode["return"] for c in out] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # the script answers 632 to both
    (first, spec0), (second, spec1) = generate.requests
    assert (first, spec0.n) == (2, 3) and (second, spec1.n) == (6, 1)  # one prefill per prompt, then per episode
    assert spec0.seed != spec1.seed
    m = episode_metrics(out)
    assert m["episodes"] == 6 and m["env/turns"] == 2.0 and m["env/return"] == 0.5
    assert m["env/reward_per_turn"] == 0.25 and m["env/info/tool_calls"] == 1.0 and m["env/observation_tokens"] == 8
    assert m["env/failures"] == 0


def test_a_text_prompt_gets_its_observations_as_text(tok):
    row = {"prompt": "guess:", "answer": "", "secret": 37}
    guesses = iter(["50", "25", "37"])
    [c], _ = run(tok, "guess", lambda ctx: next(guesses), [row], [tok("guess:").input_ids])
    assert tok.decode(c.token_ids, skip_special_tokens=False) == "50</s>lower25</s>higher37</s>"
    assert c.episode["return"] == 1.0 and c.episode["turns"] == 3 and c.episode["info"] == {"guesses": 3.0}


def test_the_environment_speaks_first(tok):
    row = {"messages": [{"role": "system", "content": "be nice"}], "answer": ""}
    [c], _ = run(tok, f"{HERE}:Greeter", lambda ctx: "hi" if ctx.endswith("U:hello\nA:") else "no", [row],
                 [chat_prompt(tok, row)])
    assert tok.decode(c.episode["prompt_ids"], skip_special_tokens=False) == "S:be nice\nU:hello\nA:"
    assert c.episode["return"] == 1.0 and c.token_ids == tok("hi", add_special_tokens=False).input_ids + [2]


@pytest.mark.timeout(60)
def test_failing_environments_fail_their_episodes_only(tok):
    rows = [{"prompt": "p", "answer": ""}]
    [c], _ = run(tok, f"{HERE}:Raiser", lambda ctx: "a", rows, [[5]])
    assert c.episode["error"].startswith("environment raised RuntimeError: boom (at test_episodes.py:")
    assert c.episode["rewards"] == [0.5] and c.finish_reason == "stop"
    [c], _ = run(tok, f"{HERE}:Nonsense", lambda ctx: "a", rows, [[5]])
    assert "step()'s reward must be a finite number, got nan" in c.episode["error"]
    [c], _ = run(tok, f"{HERE}:Dies", lambda ctx: "a", rows, [[5]])
    assert "died (exit code 3)" in c.episode["error"]
    assert episode_metrics([c])["env/failures"] == 1


@pytest.mark.timeout(60)
def test_a_hanging_environment_is_killed_and_the_next_episodes_play(tok):
    worker = EnvWorker(f"{HERE}:Sleeper", {}, timeout_s=1.0)
    rows = [{"prompt": "p", "answer": ""}]
    spec = SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=1)
    try:
        t = time.monotonic()
        out = play(scripted(tok, lambda ctx: "sleep"), worker, rows, [[5]], spec, ChatRenderer(tok),
                   Limits(2, 64, 8, 64))
        assert time.monotonic() - t < 10
        assert all("was still stepping its episodes after its deadline" in c.episode["error"] for c in out)
        out = play(scripted(tok, lambda ctx: "fine"), worker, rows, [[5]], spec, ChatRenderer(tok),
                   Limits(2, 64, 8, 64))
        assert [c.episode["return"] for c in out] == [1.0, 1.0] and worker.counts()["kills"] == 1
    finally:
        worker.shutdown()


def test_a_stepped_episode_that_is_gone_says_so():
    worker = EnvWorker("tools", {}, timeout_s=5)
    try:
        [s], _ = worker.step(["nope"], ["x"])
        assert "the episode's environment is gone" in s.error
    finally:
        worker.shutdown()


def test_built_in_environments_and_tools_directly():
    assert [calculator(x) for x in ("347+285", "7/2", "2**10", "6/3", "-(3-5)*4")] == ["632", "3.5", "1024", "2", "8"]
    for bad in ("__import__('os')", "a+1", "2**1000", "1" * 300):
        with pytest.raises(ValueError):
            calculator(bad)
    env = Tools()
    env.reset({"answer": "12"})
    assert env.step("<calc>3*4</calc>") == ("12", 0.0, False, {"tool_calls": 1, "tool_errors": 0})
    assert env.step("<search>x</search>")[0] == "error: no tool 'search' (tools: calc)"
    assert env.step(" 12 ")[1:3] == (1.0, True)
    game = GuessNumber(low=1, high=10, max_guesses=2)
    game.reset({"prompt": "any"})
    assert 1 <= game.secret <= 10
    game.reset({"secret": 4})
    assert game.step("5") == ("lower", 0.0, False, {"guesses": 1})
    assert game.step("six") == ("say a number", 0.0, True, {"guesses": 0})  # the second and last guess


def test_environment_args_are_checked_by_name():
    check_env_args("guess", {"low": 0, "high": 9})
    with pytest.raises(TypeError, match="environment 'guess': arg 'low' must be int, got str"):
        check_env_args("guess", {"low": "0"})
    with pytest.raises(TypeError, match="environment 'tools' takes no arg 'tool'"):
        check_env_args("tools", {"tool": {}})
    with pytest.raises(TypeError, match="tool 'nope' is not registered"):
        check_env_args("tools", {"tools": {"x": "nope"}})
    with pytest.raises(KeyError, match="environment 'chess' is not registered"):
        check_env_args("chess", {})


class Closes:
    """Writes a line to ``path`` when closed; never ends an episode itself."""

    def __init__(self, *, path: str):
        self.path = path

    def reset(self, row):
        pass

    def step(self, action):
        return "more", 0.0, False

    def close(self):
        with open(self.path, "a") as f:
            f.write("closed\n")


class Narrator:
    role = "narrator"

    def reset(self, row):
        pass

    def step(self, action):
        return "x", 0.0, False


def test_episodes_the_environment_did_not_end_are_closed(tok, tmp_path):
    path = tmp_path / "closed.txt"
    out, _ = run(tok, f"{HERE}:Closes", lambda ctx: "a", [{"prompt": "p", "answer": ""}], [[5]], n=3,
                 limits=Limits(2, 64, 8, 64), args={"path": str(path)})
    assert [c.finish_reason for c in out] == ["turns"] * 3
    assert path.read_text().count("closed") == 3  # each episode's environment, when the turn limit ended it


def test_observations_the_template_cannot_render_fail_their_episode(tok):
    # a role the template does not know fails at reset, naming it
    [c], _ = run(tok, f"{HERE}:Narrator", lambda ctx: "a", [CHAT_ROW], [chat_prompt(tok)])
    assert "its role 'narrator' is not one of system, user, assistant, tool" in c.episode["error"]
    # a template that rewrites earlier turns fails the episode at its first observation, not the run
    # (as "thinking" templates drop an earlier assistant turn's reasoning: here its whole content)
    thinking = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A:' }}{% if loop.last %}"
                "{{ m['content'] }}{% endif %}{{ eos_token }}{% else %}{{ m['role'][0] + ':' + m['content'] + '\n' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    worker = EnvWorker("tools", {}, timeout_s=5)
    try:
        [c] = play(scripted(tok, calc_policy), worker, [CHAT_ROW], [chat_prompt(tok)],
                   SamplingSpec(n=1, max_new_tokens=32, temperature=1.0, seed=1), ChatRenderer(tok, thinking),
                   Limits(4, 256, 32, 256))
    finally:
        worker.shutdown()
    assert c.finish_reason == "stop" and "cannot be rendered" in c.episode["error"]
    assert "rewriting the turns before it" in c.episode["error"] and c.episode["rewards"] == [0.0]


def test_prompts_of_different_room_do_not_share_the_first_request(tok):
    short, long = tok("1+2=").input_ids, tok("x" * 40).input_ids
    rows = [{"prompt": "1+2=", "answer": ""}, {"prompt": "x" * 40, "answer": ""}]
    worker = EnvWorker("guess", {"max_guesses": 1}, timeout_s=5)
    generate = scripted(tok, lambda ctx: "12345678")
    try:
        out = play(generate, worker, rows, [short, long], SamplingSpec(n=2, max_new_tokens=9, temperature=1.0, seed=1),
                   ChatRenderer(tok), Limits(1, 64, 9, 46))
    finally:
        worker.shutdown()
    # the long prompt leaves 6 tokens of context; the short one's turns still get their 9 (8 digits and the end)
    assert [c.finish_reason for c in out] == ["stop", "stop", "length", "length"]
    assert [len(c.token_ids) for c in out] == [9, 9, 6, 6]
