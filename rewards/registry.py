"""Reward functions by name.

A reward is a plain function ``(prompts, responses, answer, *, scale: float = 1.0, **row_fields) ->
list[float | None]``: one score per response. The data rows' other columns arrive as lists (``answer=[...]``) in the
positional parameters of their name and in a ``**row_fields`` catch-all (a function without one gets only the
columns it names). The config's ``args`` are its keyword-only parameters (after ``*``), and only those: an arg it
does not declare, or whose value does not match the parameter's annotation (``bool``, ``int``, ``float``, ``str``,
``list[str]``, ``dict[str, float]``, ``X | None``, ``Literal[...]``), stops the run's start naming it; a
keyword-only parameter without a default must be given in ``args``; a column named like a keyword-only parameter
does not reach it. ``None`` means "cannot score this one" and is treated like a failure (the configured fallback
is used). An entry may instead be a dict with a ``"score"`` and named components.

Three other shapes are accepted:
- a class whose instances have that call: built once per reward actor with the config's ``args`` as keyword
  arguments, which are then the parameters of its ``__init__`` (load a model there);
- an ``async def`` function (or a class with an async ``__call__``): awaited where the reward runs;
- a function of one sample, ``(prompt, response, answer, *, args..., **row) -> float | None``, wrapped with
  :func:`per_sample`.

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
import types
import typing
from typing import Callable

log = logging.getLogger("chorus.rewards")

RewardFn = Callable[..., list]

_REGISTRY: dict[str, RewardFn] = {}


def registrar(table: dict, kind: str) -> Callable[[str], Callable]:
    """``register(name)``, a decorator that puts what it decorates into ``table`` under ``name`` (a name taken twice
    raises, naming the ``kind``): the registries of rewards here, of environments and tools in rewards/envs.py."""

    def register(name: str) -> Callable:
        def wrap(obj):
            if name in table:
                raise ValueError(f"{kind} '{name}' is registered twice")
            table[name] = obj
            return obj

        return wrap

    return register


register = registrar(_REGISTRY, "reward")  # register("name") on a reward function or class


def import_attr(name: str, kind: str):
    """``module:attr`` of the user's own module (``kind`` names it in the error): KeyError if it cannot be had."""
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise KeyError(f"{kind} '{name}': cannot import ({exc})") from None


def _row_params(fn) -> tuple[set[str], bool]:
    """The parameters of ``fn`` that row fields fill (by name, not keyword-only) and whether it has a ``**``
    catch-all, which takes every other field."""
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}, any(p.kind is p.VAR_KEYWORD for p in params)


def _keyword_only(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def per_sample(fn: Callable[..., float | None]) -> RewardFn:
    """Turn ``fn(prompt, response, **row) -> score`` into a batched reward. An exception on one sample makes that
    sample's score ``None`` (counted as a failure), not the batch's. Row fields go to ``fn``'s parameters of their
    name and to its ``**`` catch-all, never to a keyword-only parameter (those are the config's ``args``).

    >>> @per_sample
    ... def longer(prompt, response, answer):
    ...     return float(len(response) > len(answer))
    >>> longer(["p", "p"], ["abc", "a"], answer=["ab", "ab"])
    [1.0, 0.0]
    """

    named, takes_all = _row_params(fn)
    args = _keyword_only(fn)

    @functools.wraps(fn)
    def batched(prompts: list[str], responses: list[str], **fields) -> list:
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            # every field is a list with one value per sample; pass the ones fn takes
            row = {k: v[i] for k, v in fields.items() if k not in args and (takes_all or k in named)}
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
    """The reward ``name`` ready to call as ``fn(prompts, responses, **fields)``, its ``args`` checked and bound as
    :func:`check_args` says: a class is built with them; a function gets them as its keyword-only arguments and, of
    the row fields, those its other parameters name (all of them with a ``**`` catch-all); an async one is run to
    completion on each call."""
    target, args = resolve(name), dict(args or {})
    check_args(name, args)
    if inspect.isclass(target):
        fn = target(**args)
        if not inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
            return fn  # itself, so that its close() is found
        named, takes_all, reserved = set(), True, set()  # a class's __call__ gets every row field
    else:
        if hasattr(target, "per_sample"):
            fn = per_sample(functools.partial(target.per_sample, **args))
        else:
            fn = functools.partial(target, **args) if args else target
        named, takes_all = _row_params(target)
        reserved = _keyword_only(target)  # the args' names: a column of that name would override the config
    is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))

    def call(prompts: list[str], responses: list[str], **fields) -> list:
        fields = {k: v for k, v in fields.items() if k not in reserved and (takes_all or k in named)}
        return asyncio.run(fn(prompts, responses, **fields)) if is_async else fn(prompts, responses, **fields)

    if hasattr(fn, "close"):
        call.close = fn.close
    return call


class RewardArgError(TypeError):
    """A reward's config ``args`` hold one it does not declare, one of the wrong type, or lack a required one;
    ``arg`` names it (None when the message is about the args as a whole)."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg


def check_args(name: str, args: dict) -> None:
    """Raise KeyError for an unknown reward, :class:`RewardArgError` for ``args`` it does not take: a name that is
    not a keyword-only parameter of its function (``**row_fields`` takes row fields, not args) or a parameter of its
    class's ``__init__``, a value that does not match that parameter's annotation, a required one missing, or what a
    class's static ``check_args(**args)`` rejects. Builds nothing, so a model a class loads is not loaded here."""
    target = resolve(name)
    check_target_args(getattr(target, "per_sample", target), name, args)


def check_target_args(target, name: str, args: dict, kind: str = "reward") -> None:
    """:func:`check_args` for a function or class already resolved (a reward, or an environment: ``kind``)."""
    is_class = inspect.isclass(target)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C callable (a class without __init__: no args)
        if not is_class:
            return
        params = {}
    if is_class:
        declared = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        where, scope = f"{target.__name__}.__init__", getattr(target.__init__, "__globals__", {})
    else:
        declared = {n: p for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        code = inspect.unwrap(target) if inspect.isroutine(target) else type(target).__call__  # or an instance
        where, scope = "its keyword-only parameters", getattr(code, "__globals__", {})
    for arg, value in args.items():
        if arg not in declared:
            hint = (f"'{arg}' is a parameter that row fields fill; declare it after `*` to take it from args"
                    if arg in params and params[arg].kind is not params[arg].VAR_KEYWORD else
                    f"it takes {sorted(declared)} ({where})" if declared else f"it takes no args ({where})")
            raise RewardArgError(f"{kind} '{name}' takes no arg '{arg}': {hint}", arg)
        annotation = _annotation(declared[arg], scope)
        if not _matches(value, annotation):
            raise RewardArgError(f"{kind} '{name}': arg '{arg}' must be {_describe(declared[arg], annotation)}, got "
                                 f"{type(value).__name__} {_short(value)}", arg)
    missing = [n for n, p in declared.items() if p.default is p.empty and n not in args]
    if missing:
        raise RewardArgError(f"{kind} '{name}' needs arg '{missing[0]}' ({where})", missing[0])
    if is_class and hasattr(target, "check_args"):  # the class's own checks, e.g. the judge's template
        try:
            target.check_args(**args)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise RewardArgError(f"{kind} '{name}': {exc}") from None


def _annotation(param: inspect.Parameter, scope: dict):
    """The parameter's annotation as a type (``from __future__ import annotations`` leaves a string), or None
    where it has none or it cannot be evaluated (then its args are not type-checked)."""
    annotation = param.annotation
    if annotation is param.empty:
        return None
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, scope, {})  # noqa: S307  (the reward's own source, as typing does)
        except Exception:  # noqa: BLE001  (a name only a type checker sees)
            return None
    return annotation


def _matches(value, annotation) -> bool:
    """Whether a config value (YAML or JSON: bool, int, float, str, list, dict, None) fits ``annotation``. An int
    fits float; a bool fits neither int nor float. Annotations other than those listed in the module docstring are
    not checked."""
    if annotation is None or annotation is typing.Any:
        return True
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in params)
    if origin is typing.Literal:
        return any(value == p and type(value) is type(p) for p in params)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list or origin is list:
        return isinstance(value, list) and (not params or all(_matches(v, params[0]) for v in value))
    if annotation is dict or origin is dict:
        return isinstance(value, dict) and (len(params) != 2 or all(
            _matches(k, params[0]) and _matches(v, params[1]) for k, v in value.items()))
    return True


def _describe(param: inspect.Parameter, annotation) -> str:
    written = param.annotation
    if isinstance(written, str):
        return written
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation).replace(
        "typing.", "")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        return import_attr(name, "reward")
    if name not in _REGISTRY:
        raise KeyError(f"reward '{name}' is not registered; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
