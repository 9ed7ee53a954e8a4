"""Reward functions by name.

A reward is a plain function ``(prompts, responses, **fields) -> list[float | None]``: one score per response,
``fields`` being the data rows' other columns as lists (``answer=[...]``) plus the config's ``args``. ``None``
means "cannot score this one" and is treated like a failure (the configured fallback is used). An entry may
instead be a dict with a ``"score"`` and named components.

Three other shapes are accepted:
- a class whose instances have that call: built once per reward actor with the config's ``args`` as keyword
  arguments (load a model in ``__init__``);
- an ``async def`` function (or a class with an async ``__call__``): awaited where the reward runs;
- a function of one sample, ``(prompt, response, **row) -> float | None``, wrapped with :func:`per_sample`.

Reference it in the config by its registered name or as ``package.module:attr``.

The reward actor runs each reward in a process of its own, killed if it hangs. A reward that must run in the
actor's own process (it calls other Ray actors, as the LLM judge does) says so with a class or function
attribute ``isolation = "thread"``; the config's ``isolation`` key overrides either.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
from typing import Callable

log = logging.getLogger("chorus.rewards")

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function or class under ``name`` (a decorator)."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def per_sample(fn: Callable[..., float | None]) -> RewardFn:
    """Turn ``fn(prompt, response, **row) -> score`` into a batched reward. An exception on one sample makes that
    sample's score ``None`` (counted as a failure), not the batch's.

    >>> @per_sample
    ... def longer(prompt, response, answer):
    ...     return float(len(response) > len(answer))
    >>> longer(["p", "p"], ["abc", "a"], answer=["ab", "ab"])
    [1.0, 0.0]
    """

    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    @functools.wraps(fn)
    def batched(prompts: list[str], responses: list[str], **fields) -> list:
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            # every field is a list with one value per sample; pass the ones fn takes
            row = {k: v[i] for k, v in fields.items() if takes_all or k in params}
            try:
                out.append(fn(prompt, response, **row))
            except Exception as exc:  # one bad sample fails alone
                log.warning("reward %s raised %s on prompt %r: %s", getattr(fn, "__name__", fn),
                            type(exc).__name__, prompt, exc)
                out.append(None)
        return out

    batched.per_sample = fn  # so that load() binds config args to fn, not to the lists
    return batched


def load(name: str, args: dict | None = None) -> RewardFn:
    """The reward ``name`` ready to call as ``fn(prompts, responses, **fields)``: a class is built with ``args``,
    a function gets ``args`` as fixed keyword arguments, an async one is run to completion on each call."""
    target, args = resolve(name), dict(args or {})
    if inspect.isclass(target):
        try:
            fn = target(**args)
        except TypeError as exc:
            raise TypeError(f"reward '{name}': cannot build {target.__name__}(**{args}): {exc}") from None
        args = {}
    elif hasattr(target, "per_sample"):
        fn, args = per_sample(functools.partial(target.per_sample, **args)), {}
    else:
        fn = target
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
    if is_async:
        def call(prompts, responses, **fields):
            return asyncio.run(fn(prompts, responses, **fields, **args))

        return call
    return functools.partial(fn, **args) if args else fn


def check_args(name: str, args: dict) -> None:
    """Raise KeyError for an unknown reward, TypeError for ``args`` that its class (or function, besides the
    prompts, responses and row fields) cannot take, or that a class's static ``check_args(**args)`` rejects;
    builds nothing, so a model a class loads is not loaded here."""
    target = resolve(name)
    target = getattr(target, "per_sample", target)
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    if inspect.isclass(target):
        try:
            sig.bind(**args)
            if hasattr(target, "check_args"):  # the class's own checks, e.g. the judge's template
                target.check_args(**args)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise TypeError(f"reward '{name}': {exc}") from None
    elif not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        if unknown := set(args) - set(sig.parameters):
            raise TypeError(f"reward '{name}' takes no argument {sorted(unknown)}")


ISOLATION = ("process", "thread")


def isolation(name: str, configured: str = "") -> str:
    """Where reward ``name`` runs: ``configured`` (the config's ``isolation``) if set, else the reward's own default
    (``"process"``: its own, killed when it hangs; or ``"thread"``). A reward that declares ``"thread"`` (it needs
    the reward actor's process, as the judge needs Ray) cannot be configured into a process."""
    declared = getattr(resolve(name), "isolation", "process")
    if declared not in ISOLATION:
        raise ValueError(f"reward '{name}': isolation = {declared!r} is not one of {list(ISOLATION)}")
    if declared == "thread" and configured == "process":
        raise ValueError(f"reward '{name}' must run in the reward actor's own process (isolation: thread)")
    return configured or declared


def resolve(name: str) -> RewardFn:
    """A registered name, or ``module:attr`` of the user's own module: the function or class itself."""
    import rewards.execution  # noqa: F401  (these register the built-ins)
    import rewards.judge  # noqa: F401
    import rewards.rules  # noqa: F401
    import rewards.similarity  # noqa: F401
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
