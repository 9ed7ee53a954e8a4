"""Reward functions by name.

A reward is a plain function ``(prompts, responses, **fields) -> list[float | None]``: one score per response,
``fields`` being the data rows' other columns as lists (``answer=[...]``) plus the config's ``args``. ``None``
means "cannot score this one" and is treated like a failure (the configured fallback is used).
Reference it in the config by its registered name or as ``package.module:function``.
"""

from __future__ import annotations

import importlib
from typing import Callable

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def resolve(name: str) -> RewardFn:
    """A registered name, or ``module:attr`` of the user's own module."""
    import rewards.execution  # noqa: F401  (these register the built-ins)
    import rewards.rules  # noqa: F401
    import rewards.structured  # noqa: F401

    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise KeyError(f"reward '{name}': cannot import ({exc})") from None
    if name not in _REGISTRY:
        raise KeyError(f"reward '{name}' is not registered; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
