"""Multi-turn rollouts: the engines generate a turn, the environments answer, until an episode ends or a limit.

An episode starts from its prompt's token ids (and the environment's first observation, if ``reset`` gives one).
Each turn, the engines continue every running episode's tokens with one sample (``rollout.max_new_tokens`` at most,
ended by the end token); the episode's environment takes the turn's text and answers with an observation, a reward
and whether it is done. The observation's tokens are appended after the model's end token: rendered with the chat
template as the environment's turn (``rollout/chat.py: ChatRenderer.turns``, the next assistant header included)
for a conversation, as plain text for a text prompt. The model's tokens keep the log-probabilities the engine
returned; observation tokens get 0 and a 0 in the loss mask. An episode ends when the environment says done or
fails, when a turn runs out of tokens without its end token (``length``), when the next observation would not fit
in ``env.max_tokens`` or the engine's context (``length``), or after ``env.max_turns`` turns (``turns``).

The tokens are never re-tokenised from text: what the learner trains on is what the engine generated and what the
environment's turns rendered to.

No Ray here: ``generate(prompts, spec)`` is the rollout engines' call and ``envs`` an :class:`Envs` (the env actors,
or one :class:`rewards.env_worker.EnvWorker` for ``chorus env play``).
"""

from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from rollout.chat import TemplateError
from rollout.types import Completion, EnvStep, SamplingSpec

log = logging.getLogger("chorus")


class Envs(Protocol):
    def reset(self, keys: list[str], rows: list[dict]) -> tuple[list[EnvStep], float]: ...

    def step(self, keys: list[str], actions: list[str]) -> tuple[list[EnvStep], float]: ...

    def close(self, keys: list[str]) -> None: ...


@dataclass
class Limits:
    max_turns: int  # model turns per episode
    max_tokens: int  # response tokens per episode: the model's and the observations'
    max_new_tokens: int  # per model turn
    max_model_len: int  # the engines' context: prompt and response

    @classmethod
    def of(cls, cfg) -> "Limits":
        """The limits a config (``ChorusConfig``) sets: ``env.max_turns``, ``env.max_tokens`` (0: the context),
        ``rollout.max_new_tokens`` and ``rollout.max_model_len``."""
        e, rc = cfg.env, cfg.rollout
        return cls(max_turns=e.max_turns, max_tokens=e.max_tokens or rc.max_model_len,
                   max_new_tokens=rc.max_new_tokens, max_model_len=rc.max_model_len)


@dataclass
class Episode:
    key: str
    row: dict
    prompt: list[int]  # the prompt's token ids (with the environment's first observation, if any)
    messages: list[dict] | None  # the conversation so far, for rendering observations; None = a text episode
    tokens: list[int] = field(default_factory=list)  # the response: model turns and observations
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # per environment step
    info: dict[str, float] = field(default_factory=dict)  # summed over the steps
    turns: int = 0
    text: str = ""  # the model's last turn
    finish: str = ""  # "" while it runs
    error: str = ""
    extended: bool = False  # the prompt holds the environment's first observation

    def end(self, finish: str, error: str = "") -> None:
        self.finish, self.error = finish, error


def play(generate: Callable[[list[list[int]], SamplingSpec], list[Completion]], envs: Envs, rows: list[dict],
         prompt_ids: list[list[int]], spec: SamplingSpec, renderer, limits: Limits) -> list[Completion]:
    """``spec.n`` episodes of each row (prompt-major, as ``generate`` returns completions), each as a
    :class:`Completion` whose ``prompt_index`` indexes ``rows``; ``episode`` holds its turns, return, per-step
    rewards, summed info and error, and ``env_seconds`` the environment time of the whole call (on the first)."""
    prefix = uuid.uuid4().hex[:12]  # keys unique among every episode the env actors hold
    episodes = [Episode(f"{prefix}-{i * spec.n + j}", row, list(ids), row.get("messages"))
                for i, (row, ids) in enumerate(zip(rows, prompt_ids)) for j in range(spec.n)]
    try:
        return _play(generate, envs, episodes, len(rows), spec, renderer, limits)
    finally:  # the environment did not end these (a limit, or the call failed or was interrupted): drop their state
        dangling = [e.key for e in episodes if e.finish in ("", "length", "turns")]
        if dangling:
            try:
                envs.close(dangling)
            except Exception as exc:  # noqa: BLE001  (an error on the way out must not hide the one that ended it)
                log.warning("could not close %d episodes' environments: %s", len(dangling), exc)


def _play(generate, envs: Envs, episodes: list[Episode], num_rows: int, spec: SamplingSpec, renderer,
          limits: Limits) -> list[Completion]:
    first, env_seconds = envs.reset([e.key for e in episodes], [e.row for e in episodes])
    env_calls = 1
    for e, s in zip(episodes, first):
        if s.error:
            e.end("stop", s.error)
        elif s.observation is not None:
            try:
                e.prompt, e.extended = _with_first_observation(e, s.observation, renderer), True
            except TemplateError as exc:
                e.end("stop", f"its first observation (role {s.observation['role']!r}) cannot be rendered: {exc}")
    shared = all(episodes[i * spec.n].prompt == e.prompt for i in range(num_rows)
                 for e in episodes[i * spec.n:(i + 1) * spec.n]) and not any(e.finish for e in episodes)
    for turn in range(limits.max_turns):
        for e in episodes:
            if not e.finish and _room(e, limits) <= 0:  # no token left for a turn
                e.end("length")
        running = [e for e in episodes if not e.finish]
        if not running:
            break
        seed = None if spec.seed is None else spec.seed + turn * 1_000_003
        rooms = {_room(e, limits) for e in running}
        if turn == 0 and shared and len(running) == len(episodes) and len(rooms) == 1:
            # every sample of a prompt starts alike: one request with n samples each (one prefill per prompt)
            outs = generate([episodes[i * spec.n].prompt for i in range(num_rows)],
                            replace(spec, max_new_tokens=rooms.pop(), seed=seed))
            turn_out = dict(zip((e.key for e in running), outs))
        else:
            turn_out = _one_turn(generate, running, spec, seed, limits)
        acting = []
        for e in running:
            c = turn_out[e.key]
            e.tokens += c.token_ids
            e.logprobs += c.logprobs
            e.mask += [1] * len(c.token_ids)
            e.turns += 1
            e.text = c.text
            if c.finish_reason == "length":  # cut off inside its turn: there is no action to take
                e.end("length")
            else:
                acting.append(e)
        if not acting:
            continue
        steps, seconds = envs.step([e.key for e in acting], [e.text for e in acting])
        env_seconds, env_calls = env_seconds + seconds, env_calls + 1
        for e, s in zip(acting, steps):
            if s.error:
                e.end("stop", s.error)
                continue
            e.rewards.append(s.reward)
            for k, v in s.info.items():
                e.info[k] = e.info.get(k, 0.0) + v
            if s.done:
                e.end("stop")
            elif e.turns >= limits.max_turns:
                e.end("turns")
            elif s.observation is not None:
                _observe(e, s.observation, renderer, limits)
    for e in episodes:
        if not e.finish:  # every turn taken and no end said: the turn limit
            e.end("turns")
    return [_completion(i // spec.n, e, (env_seconds, env_calls) if i == 0 else (0.0, 0))
            for i, e in enumerate(episodes)]


def episode_metrics(completions: list[Completion]) -> dict:
    """A step's (or an evaluation's) episode figures, the metrics.jsonl keys (none without episodes): ``episodes``,
    ``env/turns`` (model turns per episode), ``env/return``, ``env/reward_per_turn`` (per environment step),
    ``env/failures`` (episodes whose environment failed), ``env/observation_tokens`` (per episode),
    ``env/latency_seconds`` (one environment call; absent when the episodes that carry the calls' timing are not
    among ``completions``) and ``env/info/<key>`` (each info counter per episode)."""
    episodes = [c.episode for c in completions if c.episode is not None]
    if not episodes:
        return {}
    steps = sum(len(e["rewards"]) for e in episodes)
    calls = sum(e.get("env_calls", 0) for e in episodes)
    out = {"episodes": len(episodes), "env/turns": sum(e["turns"] for e in episodes) / len(episodes),
           "env/return": sum(e["return"] for e in episodes) / len(episodes),
           "env/reward_per_turn": sum(sum(e["rewards"]) for e in episodes) / steps if steps else 0.0,
           "env/failures": sum(bool(e["error"]) for e in episodes),
           "env/observation_tokens": sum(len(c.loss_mask) - sum(c.loss_mask) for c in completions
                                         if c.episode is not None) / len(episodes)}
    if calls:  # the call's timing rides on its first episode, which a dropped group may have taken along
        out["env/latency_seconds"] = sum(e["env_seconds"] for e in episodes) / calls
    for key in sorted({k for e in episodes for k in e["info"]}):
        out[f"env/info/{key}"] = sum(e["info"].get(key, 0.0) for e in episodes) / len(episodes)
    return out


def _room(e: Episode, limits: Limits) -> int:
    """Tokens the episode's next turn may take: the turn limit, the episode's budget, the engine's context."""
    return min(limits.max_new_tokens, limits.max_tokens - len(e.tokens),
               limits.max_model_len - len(e.prompt) - len(e.tokens))


def _one_turn(generate, running: list[Episode], spec: SamplingSpec, seed: int | None, limits: Limits
              ) -> dict[str, Completion]:
    """One sample continuing each running episode; episodes with the same room left go in one request."""
    out: dict[str, Completion] = {}
    by_room = itertools.groupby(sorted(running, key=lambda e: _room(e, limits)), key=lambda e: _room(e, limits))
    for room, group in by_room:
        group = list(group)
        completions = generate([e.prompt + e.tokens for e in group],
                               replace(spec, n=1, max_new_tokens=room,
                                       seed=None if seed is None else seed + 7919 * room))
        for c in completions:
            out[group[c.prompt_index].key] = c
    return out


def _observation_ids(e: Episode, observation: dict, renderer) -> list[int]:
    if e.messages is None:
        return renderer.ids(observation["content"])
    return renderer.turns(e.messages + [{"role": "assistant", "content": e.text}], [observation])


def _observe(e: Episode, observation: dict, renderer, limits: Limits) -> None:
    """Append the environment's turn, or end the episode where it would not fit with a token to answer it (or the
    chat template cannot render it: the episode fails, its environment's fault or the template's)."""
    try:
        ids = _observation_ids(e, observation, renderer)
    except TemplateError as exc:
        e.end("stop", f"its observation (role {observation['role']!r}) cannot be rendered: {exc}")
        return
    if len(e.tokens) + len(ids) >= limits.max_tokens or \
            len(e.prompt) + len(e.tokens) + len(ids) >= limits.max_model_len:
        e.end("length")
        return
    if e.messages is not None:
        e.messages = e.messages + [{"role": "assistant", "content": e.text}, observation]
    e.tokens += ids
    e.logprobs += [0.0] * len(ids)
    e.mask += [0] * len(ids)


def _with_first_observation(e: Episode, observation: dict, renderer) -> list[int]:
    """The prompt followed by the environment's first turn, before the model's first."""
    if e.messages is None:
        return e.prompt + renderer.ids(observation["content"])
    e.messages = e.messages + [observation]
    return renderer.ids(renderer.render(e.messages, generation_prompt=True))


def _completion(prompt_index: int, e: Episode, env_time: tuple[float, int]) -> Completion:
    """The episode as a completion; the call's environment seconds and calls go on the first one only."""
    episode = {"turns": e.turns, "return": sum(e.rewards), "rewards": e.rewards, "info": e.info, "error": e.error,
               "env_seconds": env_time[0], "env_calls": env_time[1]}
    if e.extended:  # the environment's first observation made the prompt longer than the data's
        episode["prompt_ids"] = e.prompt
    return Completion(prompt_index, e.tokens, e.logprobs, e.text, e.finish, loss_mask=e.mask, episode=episode)


class EnvGroup:
    """:class:`Envs` over the env actors: an episode lives on actor ``index % size`` of its key's index, all its
    calls go there; the actors work in parallel, and a call's seconds are the slowest actor's."""

    def __init__(self, group):
        self.group = group

    def _map(self, method: str, keys: list[str], items: list | None) -> tuple[list[EnvStep], float]:
        size = len(self.group)
        shards: list[list[int]] = [[] for _ in range(size)]
        for i, key in enumerate(keys):
            shards[int(key.rsplit("-", 1)[1]) % size].append(i)

        def call(actor, shard):
            args = [keys[i] for i in shard], *([[items[i] for i in shard]] if items is not None else [])
            return getattr(actor, method).remote(*args)

        results = self.group.map(call, shards)
        out: list[EnvStep | None] = [None] * len(keys)
        seconds = 0.0
        for shard, result in zip(shards, results):
            if items is None:
                continue
            steps, took = result
            seconds = max(seconds, took)
            for i, s in zip(shard, steps):
                out[i] = s
        return out, seconds

    def reset(self, keys: list[str], rows: list[dict]) -> tuple[list[EnvStep], float]:
        return self._map("reset", keys, rows)

    def step(self, keys: list[str], actions: list[str]) -> tuple[list[EnvStep], float]:
        return self._map("step", keys, actions)

    def close(self, keys: list[str]) -> None:
        self._map("close", keys, None)
