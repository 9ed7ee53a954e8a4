"""Typed records that cross actor boundaries. Fields are plain ints, floats and strings so that a record can
leave the process tree as msgpack (``to_msgpack``); inside the Ray cluster Ray's own transport carries them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgpack


@dataclass
class SamplingSpec:
    """How to generate: the engine-independent subset of sampling parameters."""

    n: int = 1  # samples per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # vLLM: prompt i of the request samples from seed + i * n (sample j from + j); hf: one
    #                          generator for the request. The same request gives the same samples on any engine,
    #                          restarted or resumed


@dataclass
class Completion:
    """One sampled response to one prompt."""

    prompt_index: int  # index of the prompt in the request this answers
    token_ids: list[int]  # [T_i] response tokens, the stop token included when it was generated
    logprobs: list[float]  # [T_i] behaviour log-probabilities of token_ids under the engine's weights
    text: str  # detokenised response without special tokens; of a multi-turn episode, the model's last turn
    finish_reason: str  # "stop" (EOS; an episode: the environment ended it) | "length" (max_new_tokens; an episode:
    #                     its token budget) | "turns" (an episode that reached env.max_turns)
    # A multi-turn episode (env.name set): token_ids hold the model's turns and the observations between them
    loss_mask: list[int] | None = None  # [T_i] 1 = a token the model generated, 0 = an observation's; None = all 1
    episode: dict | None = None  # {"turns", "return", "rewards" (per step), "info" (summed), "error", "env_seconds"}


@dataclass
class EnvStep:
    """An environment's answer for one episode (``rewards/envs.py``): to ``reset`` (its observation only) or
    ``step``."""

    observation: dict | None = None  # {"role": str, "content": str}: a turn said to the model; None = nothing
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)  # counters of this step (tool_calls, ...)
    error: str = ""  # why the episode failed (the environment raised, hung or died); "" = it did not


@dataclass
class Scored:
    """A completion's reward: total = sum_k weight_k * components[k]."""

    total: float
    components: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # names of reward functions that raised, hung or gave NaN


def to_msgpack(record) -> bytes:
    return msgpack.packb(asdict(record), use_bin_type=True)


def from_msgpack(cls, data: bytes):
    return cls(**msgpack.unpackb(data, raw=False))
