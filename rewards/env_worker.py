"""Environments at work: the episodes of one env actor, played in a child process of their own.

:class:`EnvWorker` is what an env actor runs (the actor group makes it a Ray actor) and what ``chorus env play``
runs without Ray. It holds a child process (``python -m rewards.env_worker``, started and killed as a reward's is:
``rewards/isolation.py``) that builds one environment per episode key and answers ``reset``, ``step`` and ``close``
for a batch of episodes in msgpack (the actions are model-written text: never pickle). An environment that raises,
returns what is not an observation, a reward, a done flag and numbers, or is stepped after it ended fails its own
episode (an :class:`EnvStep` with ``error``); a call past ``timeout_s`` kills the child with every episode it held,
and a child that dies takes them too: those calls fail, the next ones find the environments gone and say so, and a
fresh child serves new episodes.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from rewards.isolation import ChildProcess, RewardCallError, raised, serve
from rollout.chat import ROLES
from rollout.types import EnvStep

log = logging.getLogger("chorus.envs")


class ProcessEnv(ChildProcess):
    MODULE = "rewards.env_worker"
    doing = "stepping its episodes"


class EnvWorker:
    """Episodes of environment ``name`` (built with ``args``) in one child process. Each call takes parallel lists
    (episode keys, and rows or actions) and returns one :class:`EnvStep` per key and the call's seconds."""

    def __init__(self, name: str, args: dict | None = None, *, timeout_s: float = 30.0,
                 start_timeout_s: float = 600.0):
        self.name, self.timeout_s = name, timeout_s
        self.child = ProcessEnv({"name": name, "args": dict(args or {})}, start_timeout_s=start_timeout_s)
        try:
            self.child.await_ready()
        except RewardCallError as exc:
            self.child.close()
            raise RewardCallError(f"environment '{name}' {exc}") from None

    def _call(self, request: dict, keys: list) -> tuple[list[EnvStep], float]:
        start = time.perf_counter()
        try:
            results = self.child.reply_to(request, self.timeout_s)["results"]
            steps = [EnvStep(**r) for r in results]
        except RewardCallError as exc:  # killed, died or broke the protocol: its episodes are gone
            why = f"environment '{self.name}' {exc}"
            log.warning("%s (%d episodes lost)", why, len(keys))
            steps = [EnvStep(error=why) for _ in keys]
        return steps, time.perf_counter() - start

    def reset(self, keys: list[str], rows: list[dict]) -> tuple[list[EnvStep], float]:
        """A new environment per key, reset on its row: the first observation (``done`` stays False)."""
        return self._call({"op": "reset", "keys": keys, "rows": rows}, keys)

    def step(self, keys: list[str], actions: list[str]) -> tuple[list[EnvStep], float]:
        """Each episode's environment takes the model's turn; an episode that ends (done, or an error) is closed."""
        return self._call({"op": "step", "keys": keys, "actions": actions}, keys)

    def close(self, keys: list[str]) -> None:
        """Drop episodes that end without the environment saying so (a turn or token limit)."""
        self._call({"op": "close", "keys": keys}, keys)

    def counts(self) -> dict[str, int]:
        """Child processes killed at a deadline, died by themselves, and started (the first included)."""
        return {"kills": self.child.kills, "deaths": self.child.deaths, "starts": self.child.starts}

    def shutdown(self) -> None:
        self.child.close()

    def ready(self) -> int:
        import os

        return os.getpid()


# --- inside the child -------------------------------------------------------------------------------------------


class _Episodes:
    """The child's environments by episode key."""

    def __init__(self, spec: dict):
        from rewards.envs import env_factory

        self.make = env_factory(spec["name"], spec["args"])
        self.envs: dict[str, object] = {}
        self.roles: dict[str, str] = {}

    def reset(self, key: str, row: dict) -> dict:
        env = self.make()
        role = getattr(env, "role", "user")
        if role not in ROLES:
            raise ValueError(f"its role {role!r} is not one of {', '.join(ROLES)}")
        self.envs[key], self.roles[key] = env, role
        return {"observation": self._message(key, env.reset(row))}

    def step(self, key: str, action: str) -> dict:
        env = self.envs.get(key)
        if env is None:
            raise LookupError("the episode's environment is gone (it ended, failed, or its process was restarted)")
        out = env.step(action)
        if not isinstance(out, tuple) or len(out) not in (3, 4):
            raise TypeError(f"step() must return (observation, reward, done[, info]), got {type(out).__name__}")
        observation, reward, done, info = (*out, {}) if len(out) == 3 else out
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise TypeError(f"step()'s reward must be a finite number, got {reward!r}")
        if not isinstance(done, bool):
            raise TypeError(f"step()'s done must be a bool, got {done!r}")
        if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                 and not isinstance(v, bool) for k, v in info.items()):
            raise TypeError(f"step()'s info must be a dict of names to numbers, got {info!r}")
        message = self._message(key, observation)
        if done:  # the episode is over and scored: its close() failing is logged, not the episode's failure
            try:
                self.drop(key)
            except Exception as exc:  # noqa: BLE001
                log.warning("environment close() raised %s: %s", type(exc).__name__, exc)
        return {"observation": message, "reward": float(reward), "done": done,
                "info": {k: float(v) for k, v in info.items()}}

    def drop(self, key: str) -> None:
        """Forget the episode (first, so that it is gone even if its close() raises), then close its environment."""
        env = self.envs.pop(key, None)
        self.roles.pop(key, None)
        if env is not None and hasattr(env, "close"):
            env.close()

    def close(self) -> None:
        """At the child's end: every environment still held is closed."""
        for key in list(self.envs):
            self.drop(key)

    def _message(self, key: str, observation) -> dict | None:
        if observation is None:
            return None
        if not isinstance(observation, str):
            raise TypeError(f"an observation must be a string or None, got {type(observation).__name__}")
        return {"role": self.roles[key], "content": observation}


def _load(spec: dict) -> _Episodes:
    return _Episodes(spec)


def _handle(episodes: _Episodes, request: dict) -> dict:
    op, keys = request["op"], request["keys"]
    results = []
    if op == "close":
        for key in keys:
            try:
                episodes.drop(key)
            except Exception as exc:  # noqa: BLE001  (the others must still be dropped)
                log.warning("environment close() raised %s: %s", type(exc).__name__, exc)
        return {"results": [{} for _ in keys]}
    items = request["rows"] if op == "reset" else request["actions"]
    for key, item in zip(keys, items):
        try:
            results.append(episodes.reset(key, item) if op == "reset" else episodes.step(key, item))
        except Exception as exc:  # noqa: BLE001  (the episode fails, the others go on)
            try:
                episodes.drop(key)
            except Exception:  # noqa: BLE001  (its close() may fail the same way; the episode is over anyway)
                pass
            results.append({"error": f"environment {raised(exc)}"})
    return {"results": results}


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), _load, _handle))
