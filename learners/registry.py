"""Named variants: one registry per kind of choice (advantage estimator, policy loss, SFT token weight, KL
estimator, loss aggregation, importance-sampling correction, mu schedule).

A variant is one function registered under the name a config uses; adding one is that function and its test. The
config's choices are the registries' names (actors/config.py), so a new variant is selectable as soon as it is
registered, and a mistyped name fails at load time with the list of names.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._fns[name] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; expected one of {list(self._fns)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self):
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def names(self) -> tuple[str, ...]:
        return tuple(self._fns)
