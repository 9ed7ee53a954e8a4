"""A reward function in a child process of its own, so that one that hangs can be killed.

The reward actor calls a :class:`ProcessReward` like the function. The child (``python -m rewards.isolation``) loads
the function once (a class builds its model there) and answers calls over a pair of pipes in msgpack: prompts,
responses and row fields in, scores out; never pickle, since responses are model-written. A call past its deadline
kills the child and everything in its process group, and removes its own TMPDIR; a child that dies (a crash, the
OOM killer, ``os._exit``) or breaks the protocol fails its call. Either way a fresh child is started at once, so the next call finds the
function loaded again. The child is SIGKILLed by the kernel if the reward actor dies first.

What this costs: one Python process per reward function and reward actor, and the batch's data copied through a
pipe (a few milliseconds for a step's batch).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import msgpack

log = logging.getLogger("chorus.rewards")

MAX_MESSAGE = 1 << 30  # bytes: a batch of 64 responses of 500k characters is 32 MB
_PR_SET_PDEATHSIG = 1


class RewardCallError(RuntimeError):
    """The reward raised in its process, died, or ran past its deadline; the message says which, as a
    predicate of the reward ("raised ValueError: ...", "died (signal 9) while scoring")."""


def _plain(value):
    """msgpack's fallback for what a reward may return besides floats: numpy and torch scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot send a {type(value).__name__} back from the reward process: return floats")


class ProcessReward:
    """``ProcessReward(name, args)(prompts, responses, **fields)`` runs reward ``name`` (built with ``args`` as
    :func:`rewards.registry.load` does) in a child process. The constructor starts the process; :meth:`await_ready`
    waits until the function is loaded (``start_timeout_s``) and raises if it cannot be. :meth:`submit` then
    :meth:`result` run several in parallel."""

    def __init__(self, name: str, args: dict | None = None, *, start_timeout_s: float = 600.0):
        self.name, self.args, self.start_timeout_s = name, dict(args or {}), start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.kills = 0  # processes killed at a deadline (a call's, or loading's)
        self.deaths = 0  # processes that died by themselves
        self._calls = 0  # request ids: a reply to an abandoned request is never taken for the current one's
        self._start()

    # --- the child process ------------------------------------------------------------------------------------

    def _start(self) -> None:
        # Its own TMPDIR, removed when it is killed: what it leaves there (a sandbox's working copy) goes with it.
        self.tmpdir = tempfile.mkdtemp(prefix="chorus-reward-")
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rewards.isolation", str(req_r), str(resp_w), str(os.getpid())],
                pass_fds=(req_r, resp_w), start_new_session=True,  # its own process group, killed as one
                env={**os.environ, "TMPDIR": self.tmpdir},
            )
        except BaseException:
            for fd in (req_w, resp_r):
                os.close(fd)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        finally:
            os.close(req_r)  # the child's ends
            os.close(resp_w)
        self._requests = os.fdopen(req_w, "wb")
        self._responses = resp_r
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
        self.ready = False
        self.started_at = time.monotonic()
        self._send({"name": self.name, "args": self.args, "sys_path": sys.path})  # the user's modules too

    def await_ready(self) -> None:
        msg = self._receive(self.started_at + self.start_timeout_s, "loading")
        if "error" in msg:
            self._kill()
            raise RewardCallError(f"cannot be loaded: it {msg['error']}")
        self.ready = True

    def _send(self, message: dict) -> None:
        try:
            self._requests.write(msgpack.packb(message, default=_plain))
            self._requests.flush()
        except BrokenPipeError:  # it died: the next read says how
            pass

    def _receive(self, deadline: float, doing: str) -> dict:
        """The child's next message; at ``deadline``, or if the child dies, it is killed and this raises."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._responses, selectors.EVENT_READ)
            while True:
                for msg in self._unpacker:
                    return msg
                left = max(0.0, deadline - time.monotonic())  # past it, still take what has already come
                if not sel.select(left):
                    self.kills += 1
                    self._kill()
                    raise RewardCallError(f"was still {doing} after its deadline; its process was killed")
                chunk = os.read(self._responses, 1 << 20)
                if not chunk:  # the child is gone (or closed its end: it is killed all the same)
                    proc = self.proc
                    self.deaths += 1
                    self._kill()
                    code = proc.returncode
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    raise RewardCallError(f"died ({how}) while {doing}")
                self._unpacker.feed(chunk)

    def _kill(self) -> None:
        """SIGKILL the child's process group (its own children go too); release the pipes and its TMPDIR."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait()
            with contextlib.suppress(OSError):  # a write it never read is dropped
                self._requests.close()
        finally:
            os.close(self._responses)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.proc = None

    # --- calls ------------------------------------------------------------------------------------------------

    def submit(self, prompts: list[str], responses: list[str], **fields) -> None:
        """Send one batch. A process killed at the last call's deadline was replaced at once; if it is still
        loading, it is waited for first (up to ``start_timeout_s``, not counted in the call's timeout)."""
        if self.proc is None:  # its last replacement failed to load
            self._start()
        if not self.ready:
            self.await_ready()
        self._calls += 1
        self._send({"id": self._calls, "prompts": prompts, "responses": responses, "fields": fields})

    def result(self, timeout: float) -> list:
        """The scores of the batch sent last, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            msg = self._receive(deadline, "scoring")
            while msg.get("id") != self._calls:  # the reply to a call abandoned without its result
                msg = self._receive(deadline, "scoring")
        except Exception as exc:
            if self.proc is not None:  # not killed yet: whatever broke, this process is not trusted again
                self._kill()
            self._start()  # the replacement loads while the run goes on
            if isinstance(exc, RewardCallError):
                raise
            raise RewardCallError(f"broke the pipe protocol ({type(exc).__name__}: {exc})") from exc
        if "error" in msg:
            raise RewardCallError(msg["error"])
        return msg["scores"]

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list:
        self.submit(prompts, responses, **fields)
        return self.result(self.start_timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """End the child: it exits (calling the reward's ``close()`` if it has one) when its request pipe closes; it
        is killed if it has not within ``timeout_s``."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self._requests.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self._kill()  # and whatever it left behind in its group


# --- inside the child -------------------------------------------------------------------------------------------


def _serve(requests_fd: int, responses_fd: int, parent: int) -> int:
    # Killed when the parent dies. Strictly, when the parent *thread* that started it ends: the reward actor starts
    # and restarts these from one thread that lives as long as it does (a Ray actor's methods run on its main
    # thread).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above ran
        return 1
    for fd in (requests_fd, responses_fd):  # what the reward forks must not hold our pipes open
        os.set_inheritable(fd, False)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = os.fdopen(responses_fd, "wb")
    unpacker = msgpack.Unpacker(os.fdopen(requests_fd, "rb", buffering=0), raw=False, max_buffer_size=MAX_MESSAGE)

    def reply(message: dict) -> None:
        try:
            data = msgpack.packb(message, default=_plain)
        except (TypeError, ValueError, OverflowError) as exc:
            data = msgpack.packb({"id": message.get("id"), "error": f"returned what cannot be sent back: {exc}"})
        out.write(data)
        out.flush()

    spec = next(unpacker)
    sys.path[:] = [*spec["sys_path"], *(p for p in sys.path if p not in spec["sys_path"])]
    try:
        from rewards.registry import load

        fn = load(spec["name"], spec["args"])
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which fails the actor's start)
        reply({"error": f"raised {type(exc).__name__}: {exc}"})
        return 1
    reply({"ready": os.getpid()})
    for request in unpacker:  # until the parent closes the pipe
        try:
            scores = fn(request["prompts"], request["responses"], **request["fields"])
            reply({"id": request["id"], "scores": list(scores)})
        except Exception as exc:  # noqa: BLE001  (the parent counts it as this batch's failure)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            reply({"id": request["id"], "error": f"raised {type(exc).__name__}: {exc} (at "
                                                 f"{os.path.basename(where.filename)}:{where.lineno})"})
    if hasattr(fn, "close"):  # a class's resources (a model server, files)
        try:
            fn.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("reward %s: close() raised %s: %s", spec["name"], type(exc).__name__, exc)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
