"""Environments of multi-turn rollouts: the interface, the registry, and the built-ins (tools, a guessing game).

An environment plays one episode against the model. It is a class; chorus builds one instance per episode with the
config's ``env.args`` as keyword arguments (checked against its ``__init__`` before the run starts, as a reward's
are), then calls

    reset(row) -> observation | None
    step(action) -> (observation, reward, done)   or   (observation, reward, done, info)

- ``row``: the data row of the episode's prompt (``prompt``, ``answer`` and the other fields);
- ``action``: the text of the model's turn, without its end token;
- ``observation``: what the environment says back, a string (a turn of role ``role``, the class attribute: "user" by
  default, "tool" for a tool's result) or None (nothing; the model goes on). ``reset``'s is said before the model's
  first turn (None: the prompt alone);
- ``reward``: a float per step; the episode's return is their sum. ``done`` ends the episode;
- ``info``: optional, numbers counted per episode (``{"tool_calls": 1}``): summed over its steps and averaged over a
  step's episodes in metrics.jsonl (``env/<key>``).

The smallest one:

    class Echo:
        def __init__(self, *, rounds: int = 2):
            self.rounds, self.turns = rounds, 0

        def reset(self, row):
            self.answer = row["answer"]

        def step(self, action):
            self.turns += 1
            right = action.strip() == self.answer
            return ("right" if right else "try again"), float(right), right or self.turns >= self.rounds

Referenced as ``env.name: my_module:Echo`` (or a name registered here). Environments run in processes of their own
inside the env actors (``rewards/env_worker.py``), isolated as rewards are: one that raises fails its episode, one
that hangs past ``env.timeout_s`` is killed with the episodes it held, and the run goes on
(``chorus_env_failures_total``). ``chorus env play`` plays one against a model or a file of scripted actions.

Tools are plain functions ``fn(argument: str) -> str`` that the model calls with ``<NAME>ARGUMENT</NAME>`` in its
turn (:class:`Tools`); a function that raises answers ``error: ...``, which the model sees.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import operator
import re
from typing import Callable

from rewards.registry import check_target_args, import_attr, registrar

_ENVS: dict[str, type] = {}
_TOOLS: dict[str, Callable[[str], str]] = {}


register_env = registrar(_ENVS, "environment")  # register_env("name") on an environment class
register_tool = registrar(_TOOLS, "tool")  # register_tool("name") on a tool function fn(argument: str) -> str


def resolve_env(name: str) -> type:
    """A registered name, or ``module:Class`` of the user's own module."""
    if ":" in name:
        cls = import_attr(name, "environment")
    elif name in _ENVS:
        cls = _ENVS[name]
    else:
        raise KeyError(f"environment '{name}' is not registered; known: {sorted(_ENVS)} (or module:Class)")
    if not (inspect.isclass(cls) and callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise KeyError(f"environment '{name}' is not a class with reset(row) and step(action)")
    return cls


def check_env_args(name: str, args: dict) -> None:
    """KeyError for an unknown environment, ``RewardArgError`` (a TypeError naming the arg) for ``args`` its
    ``__init__`` does not take; builds nothing."""
    check_target_args(resolve_env(name), name, args, kind="environment")


def env_factory(name: str, args: dict) -> Callable[[], object]:
    """A function that builds one new environment (one episode's) with ``args``."""
    cls = resolve_env(name)
    check_env_args(name, args)
    return lambda: cls(**args)


def resolve_tool(name: str) -> Callable[[str], str]:
    if ":" in name:
        return import_attr(name, "tool")
    if name not in _TOOLS:
        raise KeyError(f"tool '{name}' is not registered; known: {sorted(_TOOLS)} (or module:function)")
    return _TOOLS[name]


# --- tools -------------------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


@register_tool("calculator")
def calculator(expression: str) -> str:
    """Arithmetic on numbers: ``+ - * / // % **`` and parentheses, nothing else (no names, no calls).

    >>> calculator("347+285"), calculator("7/2"), calculator("2**10"), calculator("6/3")
    ('632', '3.5', '1024', '2')
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
                raise ValueError("power too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    value = ev(tree)  # ZeroDivisionError and OverflowError say what they are
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


_CALL = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>(.*?)</\1>", re.DOTALL)


@register_env("tools")
class Tools:
    """The model calls tools by writing ``<NAME>ARGUMENT</NAME>`` in its turn (the first call of a turn is run) and
    gets the result, or ``error: ...``, as a tool turn. A turn without a call is its answer: the episode ends with
    reward 1 if it equals the row's ``answer_field`` (whitespace stripped at both ends), else 0. Each call counts in
    ``info`` as ``tool_calls``, and, if the tool is unknown or raised, ``tool_errors``. ``tools``: call name ->
    registered tool or ``module:function``."""

    role = "tool"

    def __init__(self, *, tools: dict[str, str] | None = None, answer_field: str = "answer"):
        tools = {"calc": "calculator"} if tools is None else tools
        self.tools = {name: resolve_tool(ref) for name, ref in tools.items()}
        self.answer_field = answer_field

    @staticmethod
    def check_args(*, tools: dict[str, str] | None = None, answer_field: str = "answer") -> None:
        for ref in (tools or {}).values():
            try:
                resolve_tool(ref)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None

    def reset(self, row: dict) -> None:
        self.answer = row.get(self.answer_field)
        if not isinstance(self.answer, str):
            raise ValueError(f"the row has no string field '{self.answer_field}' to check the answer against")

    def step(self, action: str):
        call = _CALL.search(action)
        if call is None:
            return None, float(action.strip() == self.answer.strip()), True, {}
        name, argument = call.group(1), call.group(2)
        if name not in self.tools:
            return f"error: no tool '{name}' (tools: {', '.join(self.tools)})", 0.0, False, \
                {"tool_calls": 1, "tool_errors": 1}
        try:
            result = str(self.tools[name](argument))
        except Exception as exc:  # noqa: BLE001  (a tool's failure is the model's to see, not the run's)
            return f"error: {type(exc).__name__}: {exc}", 0.0, False, {"tool_calls": 1, "tool_errors": 1}
        return result, 0.0, False, {"tool_calls": 1, "tool_errors": 0}


@register_env("guess")
class GuessNumber:
    """A guessing game: the model names a whole number in [low, high] and hears "higher", "lower" or "correct"
    (reward 1, the episode ends), or "say a number" for a turn without one; ``max_guesses`` turns at most. The
    secret is the row's ``secret`` field, or else drawn from a hash of its prompt, so an episode replays the same.
    ``info``: ``guesses`` (turns that named a number)."""

    role = "user"

    def __init__(self, *, low: int = 1, high: int = 100, max_guesses: int = 7):
        self.check_args(low=low, high=high, max_guesses=max_guesses)
        self.low, self.high, self.max_guesses = low, high, max_guesses

    @staticmethod
    def check_args(*, low: int = 1, high: int = 100, max_guesses: int = 7) -> None:
        if low > high:
            raise ValueError(f"low ({low}) > high ({high})")
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be >= 1, got {max_guesses}")

    def reset(self, row: dict) -> None:
        secret = row.get("secret")
        if secret is None:
            digest = hashlib.sha256(str(row.get("prompt")).encode()).digest()
            secret = self.low + int.from_bytes(digest[:8], "big") % (self.high - self.low + 1)
        self.secret, self.turns = int(secret), 0

    def step(self, action: str):
        self.turns += 1
        over = self.turns >= self.max_guesses
        number = re.search(r"-?\d+", action)
        if number is None:
            return "say a number", 0.0, over, {"guesses": 0}
        guess = int(number.group())
        if guess == self.secret:
            return "correct", 1.0, True, {"guesses": 1}
        return ("higher" if guess < self.secret else "lower"), 0.0, over, {"guesses": 1}
