"""A reward function (or an environment: ``rewards/env_worker.py``) in a child process of its own, so that one that
hangs can be killed.

The reward actor calls a :class:`ProcessReward` like the function. The child (``python -m rewards.isolation``) loads
the function once (a class builds its model there) and answers calls over a pair of pipes in msgpack: prompts,
responses and row fields in, scores out; never pickle, since responses are model-written. A call past its deadline
kills the child and everything in its process group, and removes its own TMPDIR; a child that dies (a crash, the
OOM killer, ``os._exit``) or breaks the protocol fails its call. Either way a fresh child is started at once, so the
next call finds the function loaded again. The child is SIGKILLed by the kernel if the reward actor dies first.

Text crosses as UTF-8, which a lone surrogate (``"\\ud800"``, as a model's broken JSON escape or bytes decoded with
``surrogateescape`` leave in a string) cannot be: a message that holds one is sent with :func:`replace_surrogates`
applied, so the reward gets the text with each lone surrogate replaced by U+FFFD (and a surrogate pair joined into
its character), and the batch is scored. A score that msgpack cannot carry (an int beyond 64 bits, an object) fails
that item alone: it comes back as ``None`` (an int that a float holds comes back as that float).

What this costs: one Python process per reward function and reward actor, and the batch's data copied through a
pipe (a few milliseconds for a step's batch).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(value):
    """``value`` with every string in it (in lists, tuples and dicts, keys too) encodable as UTF-8: a surrogate pair
    becomes the character it encodes, a lone surrogate U+FFFD. Other values are returned as they are.

    >>> replace_surrogates({"r": ["a\\ud800b", "\\ud83d\\ude00"]})
    {'r': ['a\ufffdb', '\U0001f600']}
    """
    if isinstance(value, str):
        if value.isascii() or _SURROGATE.search(value) is None:  # isascii: O(1), a flag of the string
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {replace_surrogates(k): replace_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [replace_surrogates(v) for v in value]
    return value


def _pack(message) -> bytes:
    """``message`` in msgpack; if a string in it holds a surrogate, with :func:`replace_surrogates` applied (only
    then: scanning every batch's text would cost every call)."""
    try:
        return msgpack.packb(message, default=_plain)
    except UnicodeEncodeError:
        return msgpack.packb(replace_surrogates(message), default=_plain)


def _sendable(score):
    """``score`` as msgpack can carry it: an int beyond 64 bits as a float (``None`` if no float holds it), a dict's
    values likewise, and anything else that cannot be packed as ``None``, a failure of this item only."""
    if isinstance(score, int) and not isinstance(score, bool) and not -(1 << 63) <= score < 1 << 64:
        try:
            return float(score)
        except OverflowError:
            return None
    if isinstance(score, dict):
        return {k: _sendable(v) for k, v in score.items()}
    try:
        _pack(score)
    except (TypeError, ValueError, OverflowError):
        return None
    return score


class ChildProcess:
    """A child process (``python -m MODULE``) that loads one object from a spec and answers requests over a pair of
    pipes in msgpack (:func:`serve` is its side). The constructor starts it; :meth:`await_ready` waits until the
    object is loaded (``start_timeout_s``) and raises if it cannot be; :meth:`send` then :meth:`reply` make one
    call. A call past its deadline, a death or a broken protocol kills the child and starts a fresh one at once.
    ``doing`` says in errors what a call does ("scoring")."""

    MODULE = "rewards.isolation"
    doing = "working"

    def __init__(self, spec: dict, *, start_timeout_s: float = 600.0):
        self.spec, self.start_timeout_s = spec, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.kills = 0  # processes killed at a deadline (a call's, or loading's)
        self.deaths = 0  # processes that died by themselves
        self.starts = 0  # processes started (the first included)
        self._calls = 0  # request ids: a reply to an abandoned request is never taken for the current one's
        self._start()

    # --- the child process ------------------------------------------------------------------------------------

    def _start(self) -> None:
        # Its own TMPDIR, removed when it is killed: what it leaves there (a sandbox's working copy) goes with it.
        self.tmpdir = tempfile.mkdtemp(prefix="chorus-child-")
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.MODULE, str(req_r), str(resp_w), str(os.getpid())],
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
        self.starts += 1
        self._requests = os.fdopen(req_w, "wb")
        self._responses = resp_r
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
        self.ready = False
        self.started_at = time.monotonic()
        self._send({**self.spec, "sys_path": sys.path})  # the user's modules too

    def await_ready(self) -> None:
        msg = self._receive(self.started_at + self.start_timeout_s, "loading")
        if "error" in msg:
            self._kill()
            raise RewardCallError(f"cannot be loaded: it {msg['error']}")
        self.ready = True

    def _send(self, message: dict) -> None:
        try:
            self._requests.write(_pack(message))
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

    def send(self, request: dict) -> None:
        """Send one request. A process killed at the last call's deadline was replaced at once; if it is still
        loading, it is waited for first (up to ``start_timeout_s``, not counted in the call's timeout)."""
        if self.proc is None:  # its last replacement failed to load
            self._start()
        if not self.ready:
            self.await_ready()
        self._calls += 1
        self._send({"id": self._calls, **request})

    def reply(self, timeout: float) -> dict:
        """The reply to the request sent last, waiting at most ``timeout`` seconds; raises
        :class:`RewardCallError` if the child failed it (``"error"`` in the reply) or failed itself."""
        deadline = time.monotonic() + timeout
        try:
            msg = self._receive(deadline, self.doing)
            while msg.get("id") != self._calls:  # the reply to a call abandoned without its result
                msg = self._receive(deadline, self.doing)
        except Exception as exc:
            if self.proc is not None:  # not killed yet: whatever broke, this process is not trusted again
                self._kill()
            self._start()  # the replacement loads while the run goes on
            if isinstance(exc, RewardCallError):
                raise
            raise RewardCallError(f"broke the pipe protocol ({type(exc).__name__}: {exc})") from exc
        if "error" in msg:
            raise RewardCallError(msg["error"])
        return msg

    def reply_to(self, request: dict, timeout: float) -> dict:
        """:meth:`send` then :meth:`reply`."""
        self.send(request)
        return self.reply(timeout)

    def close(self, timeout_s: float = 5.0) -> None:
        """End the child: it exits (calling the object's ``close()`` if it has one) when its request pipe closes; it
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


class ProcessReward(ChildProcess):
    """``ProcessReward(name, args)(prompts, responses, **fields)`` runs reward ``name`` (built with ``args`` as
    :func:`rewards.registry.load` does) in a child process. :meth:`submit` then :meth:`result` run several in
    parallel."""

    doing = "scoring"

    def __init__(self, name: str, args: dict | None = None, *, start_timeout_s: float = 600.0):
        self.name, self.args = name, dict(args or {})
        super().__init__({"name": self.name, "args": self.args}, start_timeout_s=start_timeout_s)

    def submit(self, prompts: list[str], responses: list[str], **fields) -> None:
        """Send one batch (:meth:`ChildProcess.send`)."""
        self.send({"prompts": prompts, "responses": responses, "fields": fields})

    def result(self, timeout: float) -> list:
        """The scores of the batch sent last, waiting at most ``timeout`` seconds."""
        return self.reply(timeout)["scores"]

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> list:
        self.submit(prompts, responses, **fields)
        return self.result(self.start_timeout_s)


# --- inside the child -------------------------------------------------------------------------------------------


def serve(requests_fd: int, responses_fd: int, parent: int, load, handle) -> int:
    """The child's loop: read the spec, ``load(spec)`` the object (a failure is reported and ends the child), then
    answer each request with ``handle(obj, request)``'s dict (an exception fails that request, reported with where
    it was raised) until the parent closes the pipe; then the object's ``close()``, if it has one."""
    # Killed when the parent dies. Strictly, when the parent *thread* that started it ends: the reward actor starts
    # and restarts these from one thread that lives as long as it does (a Ray actor's methods run on its main
    # thread).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above ran
        return 1
    for fd in (requests_fd, responses_fd):  # what the object forks must not hold our pipes open
        os.set_inheritable(fd, False)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = os.fdopen(responses_fd, "wb")
    unpacker = msgpack.Unpacker(os.fdopen(requests_fd, "rb", buffering=0), raw=False, max_buffer_size=MAX_MESSAGE)

    def reply(message: dict) -> None:
        try:
            data = _pack(message)
        except (TypeError, ValueError, OverflowError) as exc:
            data = None
            if "scores" in message:  # fail the items that cannot go, not the batch
                scores = [_sendable(s) for s in message["scores"]]
                bad = [type(s).__name__ for s, sent in zip(message["scores"], scores) if sent is None and s is not None]
                log.warning("reward %s: %d of %d scores cannot be sent back (%s: %s; the first a %s); they count as "
                            "failures", spec["name"], len(bad), len(scores), type(exc).__name__, exc, bad[0] if bad
                            else "value in a dict")
                with contextlib.suppress(TypeError, ValueError, OverflowError):
                    data = _pack({**message, "scores": scores})
            if data is None:
                data = _pack({"id": message.get("id"), "error": f"returned what cannot be sent back: {exc}"})
        out.write(data)
        out.flush()

    spec = next(unpacker)
    sys.path[:] = [*spec["sys_path"], *(p for p in sys.path if p not in spec["sys_path"])]
    try:
        obj = load(spec)
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which fails the actor's start)
        reply({"error": f"raised {type(exc).__name__}: {exc}"})
        return 1
    reply({"ready": os.getpid()})
    for request in unpacker:  # until the parent closes the pipe
        try:
            reply({"id": request["id"], **handle(obj, request)})
        except Exception as exc:  # noqa: BLE001  (the parent counts it as this request's failure)
            reply({"id": request["id"], "error": raised(exc)})
    if hasattr(obj, "close"):  # a class's resources (a model server, files)
        try:
            obj.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: close() raised %s: %s", spec["name"], type(exc).__name__, exc)
    return 0


def raised(exc: BaseException) -> str:
    """"raised ValueError: ... (at file.py:12)": an exception as a predicate, with where it was raised."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"raised {type(exc).__name__}: {exc}{at}"


def _load_reward(spec: dict):
    from rewards.registry import load

    return load(spec["name"], spec["args"])


def _score(fn, request: dict) -> dict:
    return {"scores": list(fn(request["prompts"], request["responses"], **request["fields"]))}


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), _load_reward, _score))
