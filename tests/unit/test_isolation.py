"""A reward in a process of its own: killed with everything it started when it hangs, replaced when it dies, and
killed by the kernel when the reward actor dies; data crosses the boundary as msgpack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from actors.config import RewardConfig, RewardFnConfig
from rewards.actor import RewardActor
from rewards.isolation import ProcessReward, RewardCallError
from tests.procs import alive, wait_dead, with_cmdline

pytestmark = pytest.mark.timeout(120)

HERE = __name__  # what the reward processes import


def moody(prompts, responses, mode, **_):
    """Does what the batch's first row asks; otherwise scores len(response), and says in which process."""
    if mode[0] == "spin":
        while True:
            pass
    if mode[0] == "fork_and_hang":  # a child of its own that would outlive a plain kill of the reward process
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["CHORUS_TEST_PIDFILE"], "w") as f:
            f.write(str(child.pid))
        time.sleep(600)
    if mode[0] == "exit":
        os._exit(3)
    if mode[0] == "raise":
        raise ValueError("no such thing")
    if mode[0] == "object":
        return [object()] * len(responses)
    if mode[0] == "numpy":
        import numpy as np

        return list(np.arange(len(responses), dtype=np.float32) + 0.5)
    if mode[0] == "unsendable":  # what msgpack cannot carry, beside what it can
        return [10**5000, 2**70, float("inf"), object(), {"score": 1.0, "big": -10**400, "ok": 2}, 4.0]
    if mode[0] == "echo":
        return [{"score": float(len(r)), "text": r} for r in responses]
    if mode[0] == "raise_text":
        raise ValueError(responses[0])
    return [{"score": float(len(r)), "pid": os.getpid()} for r in responses]


def sandboxed_sleep(prompts, responses, marker, **_):
    """Runs a sleeping program in the sandbox, as code_exec would run model-written code."""
    from rewards.sandbox import Limits, run

    run([sys.executable, "-c", f"import time; time.sleep(600)  # {marker[0]}"],
        limits=Limits(cpu_s=600, timeout_s=600))
    return [1.0] * len(responses)


class Closes:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, prompts, responses, **_):
        return [1.0] * len(responses)

    def close(self):
        Path(self.path).write_text("closed")


def sees_fields(prompts, responses, **fields):
    return [{"score": float(r == "model"), "fields": len(fields)} for r in responses]


class NeedsArg:
    def __init__(self, path: str):
        raise FileNotFoundError(f"no model at {path}")


@pytest.fixture
def reward():
    r = ProcessReward(f"{HERE}:moody")
    r.await_ready()
    yield r
    r.close()


def call(r: ProcessReward, mode: str, responses=("ab", "abc"), timeout: float = 5.0):
    r.submit(["p"] * len(responses), list(responses), mode=[mode] * len(responses))
    return r.result(timeout)


def test_scores_and_components_come_back_from_the_process(reward):
    out = call(reward, "ok")
    assert [o["score"] for o in out] == [2.0, 3.0]
    assert out[0]["pid"] == reward.proc.pid != os.getpid()


def test_a_spinning_reward_is_killed_at_its_deadline_and_replaced(reward):
    first, tmpdir = reward.proc.pid, reward.tmpdir
    for _ in range(5):  # a thread per hung call would have exhausted a pool of 4 by now
        start = time.monotonic()
        with pytest.raises(RewardCallError, match="still scoring after its deadline"):
            call(reward, "spin", timeout=0.3)
        assert time.monotonic() - start < 5.0  # the deadline, plus loading the replacement (on a busy CPU)
    assert reward.kills == 5
    assert wait_dead(first)
    assert not os.path.exists(tmpdir)  # its TMPDIR went with it
    out = call(reward, "ok")  # the replacement loaded the function again
    assert [o["score"] for o in out] == [2.0, 3.0] and out[0]["pid"] != first


def test_what_a_hung_reward_started_is_killed_with_it(reward, tmp_path, monkeypatch):
    pidfile = tmp_path / "grandchild"
    monkeypatch.setenv("CHORUS_TEST_PIDFILE", str(pidfile))
    reward.close()  # a new process, to see the variable
    reward.__init__(f"{HERE}:moody")
    with pytest.raises(RewardCallError, match="deadline"):
        call(reward, "fork_and_hang", timeout=3.0)
    grandchild = int(pidfile.read_text())
    assert wait_dead(grandchild), "the reward's own child outlived the kill"


def test_a_reward_that_exits_fails_its_call_and_is_replaced(reward):
    with pytest.raises(RewardCallError, match=r"died \(exit code 3\) while scoring"):
        call(reward, "exit")
    assert reward.deaths == 1
    assert [o["score"] for o in call(reward, "ok")] == [2.0, 3.0]


def test_a_reward_that_died_while_idle_fails_one_call_and_is_replaced(reward):
    os.kill(reward.proc.pid, signal.SIGKILL)  # between calls, as the OOM killer would
    time.sleep(0.2)
    with pytest.raises(RewardCallError, match=r"died \(signal 9\) while scoring"):
        call(reward, "ok")
    assert [o["score"] for o in call(reward, "ok")] == [2.0, 3.0]


def test_a_sandbox_dies_with_the_reward_process_that_started_it():
    """A reward killed at its deadline while a sandbox it started runs (code_exec running model-written code): the
    sandbox's supervisor has its own session, so the process-group kill misses it; the parent-death signal gets it."""
    marker = f"chorus-test-{os.getpid()}-{time.monotonic_ns()}"
    r = ProcessReward(f"{HERE}:sandboxed_sleep")
    try:
        r.submit(["p"], ["r"], marker=[marker])

        with pytest.raises(RewardCallError, match="deadline"):
            r.result(3.0)
        assert wait_dead(with_cmdline(marker.encode())), "the sandboxed program outlived the reward process"
    finally:
        r.close()


def test_a_class_is_closed_in_its_process_and_a_response_column_is_not_passed(tmp_path):
    flag = tmp_path / "closed"
    cfg = RewardConfig(functions=[RewardFnConfig(name=f"{HERE}:Closes", args={"path": str(flag)}),
                                  RewardFnConfig(name=f"{HERE}:sees_fields")])
    actor = RewardActor(cfg)
    rows = [{"prompt": "p", "answer": "a", "response": "from the data file"}]
    scored, _ = actor.score(["p"], ["model"], rows)
    # the model's response is scored, and the row's other field (answer) is the only one passed
    assert scored[0].components[f"{HERE}:sees_fields"] == 1.0
    assert scored[0].components[f"{HERE}:sees_fields.fields"] == 1.0
    actor.shutdown()
    assert flag.read_text() == "closed"


def test_an_exception_names_its_type_and_line_and_the_process_lives_on(reward):
    pid = reward.proc.pid
    with pytest.raises(RewardCallError, match=r"raised ValueError: no such thing \(at test_isolation.py:\d+\)"):
        call(reward, "raise")
    assert call(reward, "ok")[0]["pid"] == pid


def test_numpy_scores_are_sent_as_floats_and_what_cannot_be_sent_fails_its_item_alone(reward):
    assert call(reward, "numpy") == [0.5, 1.5]
    assert call(reward, "object") == [None, None]
    # a 5000-digit int and an object fail alone (None); an int past 64 bits that a float holds comes as that float;
    # inf is carried as it is (the actor gives it the fallback); a dict loses only its unsendable value
    assert call(reward, "unsendable", responses=["r"] * 6) == [
        None, float(2**70), float("inf"), None, {"score": 1.0, "big": None, "ok": 2}, 4.0]
    assert call(reward, "ok")[0]["score"] == 2.0  # the same process goes on


def test_a_lone_surrogate_reaches_the_reward_replaced_and_comes_back_in_an_error(reward):
    # "\ud800" alone cannot be UTF-8; a pair that JSON escapes split is joined into its character
    out = call(reward, "echo", responses=["a\ud800b", "\ud83d\ude00", "plain"])
    assert out == [{"score": 3.0, "text": "a\ufffdb"}, {"score": 1.0, "text": "\U0001f600"},
                   {"score": 5.0, "text": "plain"}]
    with pytest.raises(RewardCallError, match="raised ValueError: bad \ufffd"):
        call(reward, "raise_text", responses=["bad \ud800"])


def test_a_large_batch_crosses_the_pipe():
    r = ProcessReward(f"{HERE}:moody")
    try:
        responses = ["x" * 500_000] * 64  # 32 MB each way
        assert [o["score"] for o in r(["p"] * 64, responses, mode=["ok"] * 64)] == [500_000.0] * 64
    finally:
        r.close()


def test_a_reward_that_cannot_load_fails_the_actor_start_naming_it():
    cfg = RewardConfig(functions=[RewardFnConfig(name=f"{HERE}:NeedsArg", args={"path": "/nowhere"})])
    with pytest.raises(RewardCallError, match=rf"reward '{HERE}:NeedsArg' cannot be loaded: it raised "
                                              r"FileNotFoundError: no model at /nowhere"):
        RewardActor(cfg)


def test_the_reward_process_dies_with_the_reward_actor(tmp_path):
    """SIGKILL the process that owns the reward (as Ray kills an actor): the kernel kills the reward process, even
    one spinning in a hung call."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {sys.path!r}
        from rewards.isolation import ProcessReward
        r = ProcessReward("{HERE}:moody")
        r.await_ready()
        r.submit(["p"], ["a"], mode=["spin"])
        print(r.proc.pid, flush=True)
        time.sleep(600)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(owner.stdout.readline())
        assert alive(child)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert wait_dead(child), "the reward process outlived its owner"
    finally:
        owner.kill()


def test_reward_actor_runs_a_hanging_reward_beside_a_good_one_every_step():
    cfg = RewardConfig(functions=[RewardFnConfig(name="exact_match"), RewardFnConfig(name=f"{HERE}:moody")],
                       timeout_s=0.5, fallback=-1.0)
    actor = RewardActor(cfg)
    try:
        rows = [{"prompt": "p", "answer": "ab", "mode": "spin"}, {"prompt": "p", "answer": "x", "mode": "spin"}]
        for _ in range(6):  # more hung calls than the thread pool has threads
            scored, seconds = actor.score(["p", "p"], ["ab", "abc"], rows)
            # exact_match 1 / 0, moody failed: fallback -1 each
            assert [s.total for s in scored] == [0.0, -1.0]
            assert all(s.failed == [f"{HERE}:moody"] for s in scored)
            assert seconds < 5.0
        rows = [{**r, "mode": "ok"} for r in rows]
        scored, _ = actor.score(["p", "p"], ["ab", "abc"], rows)
        assert [s.total for s in scored] == [1.0 + 2.0, 0.0 + 3.0]
        assert actor.hung_calls == 0  # nothing was left hanging in a thread
    finally:
        actor.shutdown()
