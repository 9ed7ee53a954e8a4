"""``assert`` tests of ``code_exec``, checked where the model's code cannot reach.

A test such as ``assert sorted(f([3, 1])) == [1, 3]`` runs the model's code (``f``) and then compares. If the
comparison ran in the model's process, the model could forge it: replace a builtin, patch the harness, print a
verdict and exit. So the host splits each assert in two (:func:`plan`):

- the parts that need the model's code, run in the sandbox: here ``f([3, 1])``, whose value comes back as data
  (:func:`decode`; plain Python values only: numbers, strings, bytes, None, lists, tuples, sets, dicts);
- the rest, evaluated by the host (:func:`holds`) over those values: literals, arithmetic, comparisons, ``and`` /
  ``or`` / ``not``, subscripts, names bound by a literal assignment in an earlier statement, and a few pure
  builtins (``len``, ``sorted``, ``abs``, ``math.isclose`` ...; :data:`SAFE_CALLS`).

The sandbox never sees the expected values (a name bound to a literal in the tests, ``expected = [1, 3]``, is
the host's, sent to the sandbox only if code there reads it), so the values it returns can pass only by being
right: whatever the model's process does, it acts like some implementation of ``f``. Statements other than
top-level asserts (imports, helper definitions, ``s = Stack()``) run in the sandbox in order. An assert nested
inside another statement (a loop, a function) would be decided in the model's process: such a test is refused
(:class:`Uncheckable`), and the row is not scored (the reward's failure, counted), rather than scored by a verdict
the model could forge.

    >>> steps, checks = plan(["x = 4", "want = [1, 2]", "assert f(x) - 1 == x", "assert g() == want"])
    >>> steps  # want never reaches the sandbox; x does, as f's input
    [[], [], [['exec', 'x = 4'], ['eval', 'f(x)']], [['eval', 'g()']]]
    >>> holds(checks[2][0], [5]), holds(checks[3][0], [[1, 2]])
    (True, True)
"""

from __future__ import annotations

import ast
import copy
import math
from dataclasses import dataclass

MAX_DEPTH = 64  # of a returned value's nesting
MAX_ITEMS = 1_000_000  # sizes the host builds from returned values (a list repeated, a power's digits)


class Uncheckable(ValueError):
    """A test whose verdict could only be reached in the model's process."""


@dataclass
class Check:
    """One top-level assert: ``expr`` with the sandbox's parts replaced by ``_v0, _v1, ...`` (indices into the
    test's returned values, ``first`` the first of them), evaluated in ``env`` (literal names bound before it)."""
    expr: ast.expr
    first: int
    env: dict


def _pos(x, cap):
    return isinstance(x, int) and not isinstance(x, bool) and abs(x) > cap


def _mul(a, b):
    if (isinstance(a, (str, bytes, list, tuple)) and _pos(b, MAX_ITEMS // max(len(a), 1))) or \
            (isinstance(b, (str, bytes, list, tuple)) and _pos(a, MAX_ITEMS // max(len(b), 1))):
        raise OverflowError("repetition too large")
    return a * b


def _pow(a, b, *mod):
    if _pos(b, 10_000) or (isinstance(a, int) and isinstance(b, int) and b > 0 and a.bit_length() * b > 1 << 20):
        raise OverflowError("power too large")
    return pow(a, b, *mod)


def _lshift(a, b):
    if _pos(b, 1 << 20):
        raise OverflowError("shift too large")
    return a << b


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: _mul, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b, ast.Pow: _pow, ast.LShift: _lshift,
           ast.RShift: lambda a, b: a >> b, ast.BitOr: lambda a, b: a | b, ast.BitAnd: lambda a, b: a & b,
           ast.BitXor: lambda a, b: a ^ b}
_UNARY = {ast.Not: lambda a: not a, ast.USub: lambda a: -a, ast.UAdd: lambda a: +a, ast.Invert: lambda a: ~a}
_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b, ast.Is: lambda a, b: a is b,
            ast.IsNot: lambda a, b: a is not b}
TYPES = {t.__name__: t for t in (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)}
SAFE_CALLS = {f.__name__: f for f in (abs, all, any, len, max, min, sorted, sum, round, repr, isinstance)} | TYPES
SAFE_CALLS |= {"reversed": lambda x: list(reversed(x)), "type": type}
SAFE_MATH = {"isclose", "sqrt", "floor", "ceil", "fabs", "isnan", "isinf", "isfinite", "inf", "nan", "pi", "e",
             "log", "log2", "log10", "exp", "gcd", "comb", "factorial", "prod", "fsum"}


def _on_host(node: ast.AST, names: set[str]) -> bool:
    """Whether the host evaluates ``node`` itself (its children are looked at separately)."""
    if isinstance(node, (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Compare, ast.BoolOp, ast.BinOp,
                         ast.UnaryOp, ast.IfExp, ast.Subscript, ast.Slice, ast.Starred)):
        return not (isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS)
    if isinstance(node, ast.Name):
        return node.id in names or node.id in TYPES or node.id == "math"
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in SAFE_MATH
    if isinstance(node, ast.Call):
        host_func = (isinstance(node.func, ast.Name) and node.func.id in SAFE_CALLS and node.func.id not in names) \
            or _on_host(node.func, names) and isinstance(node.func, ast.Attribute)
        plain_args = not any(isinstance(a, ast.Lambda) for a in [*node.args, *(k.value for k in node.keywords)])
        return host_func and plain_args
    return False


class _Split(ast.NodeTransformer):
    """Replace each maximal part the host cannot evaluate by ``_vK``, collecting its source in ``evals``."""

    def __init__(self, names: set[str], first: int):
        self.names, self.evals, self.first = names, [], first

    def visit(self, node):
        if isinstance(node, ast.Call) and _on_host(node, self.names):  # the function's name is not a value
            node.args = [self.visit(a) for a in node.args]
            for k in node.keywords:
                k.value = self.visit(k.value)
            return node
        if isinstance(node, (ast.expr_context, ast.operator, ast.boolop, ast.cmpop, ast.unaryop, ast.keyword)) \
                or _on_host(node, self.names):
            return self.generic_visit(node)
        self.evals.append(node)
        return ast.Name(id=f"_v{self.first + len(self.evals) - 1}", ctx=ast.Load())


def plan(tests: list[str]) -> tuple[list[list[list[str]]], list[list[Check]]]:
    """The sandbox's steps per test (``["exec", source]`` or ``["eval", source]``, in order) and the host's checks
    per test. Tests share one namespace, as in the sandbox. A name bound to a literal (``expected = [1, 2]``) is the
    host's; the sandbox is sent its assignment only when code it runs reads it, so an expected value the checks
    alone use never enters the sandbox. Raises :class:`Uncheckable` (naming the test) or SyntaxError."""
    steps, checks = [], []
    env, sources, sent = {}, {}, set()  # the host's names: values, their literal source, those the sandbox has

    def send(nodes: list[ast.AST], out: list) -> None:
        """Assign, in the sandbox, the host's names ``nodes`` read that it does not have yet."""
        for node in (n for top in nodes for n in ast.walk(top)):
            if isinstance(node, ast.Name) and node.id in sources and node.id not in sent:
                out.append(["exec", f"{node.id} = {sources[node.id]}"])
                sent.add(node.id)

    for i, test in enumerate(tests):
        test_steps, test_checks, n_values = [], [], 0
        for stmt in ast.parse(test, f"test {i + 1}").body:
            if isinstance(stmt, ast.Assert):
                split = _Split(set(env), n_values)
                expr = split.visit(ast.parse(ast.unparse(stmt.test), mode="eval").body)
                send(split.evals, test_steps)
                test_steps += [["eval", ast.unparse(node)] for node in split.evals]
                test_checks.append(Check(expr, n_values, dict(env)))
                n_values += len(split.evals)
                continue
            if any(isinstance(node, ast.Assert) for node in ast.walk(stmt)):
                raise Uncheckable(f"test {i + 1} has an assert inside a {type(stmt).__name__.lower()} statement: "
                                  "it would be decided in the model's process, where it can be forged; write each "
                                  "check as a top-level assert")
            if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets) \
                    and _all_on_host(stmt.value, set(env)):
                try:
                    value = _eval(stmt.value, env)
                except Exception:  # noqa: BLE001  (not the host's after all: the sandbox runs it)
                    pass
                else:
                    inlined = _Inline(sources).visit(copy.deepcopy(stmt.value))
                    for target in stmt.targets:
                        env[target.id], sources[target.id] = value, ast.unparse(inlined)
                        sent.discard(target.id)
                    continue
            send([stmt], test_steps)
            test_steps.append(["exec", ast.unparse(stmt)])
            for name in _bound(stmt):  # names the sandbox (re)binds are no longer the host's to know
                env.pop(name, None), sources.pop(name, None), sent.discard(name)
        steps.append(test_steps)
        checks.append(test_checks)
    return steps, checks


class _Inline(ast.NodeTransformer):
    """The host's names in a literal replaced by their own literal source."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources

    def visit_Name(self, node):
        return ast.parse(self.sources[node.id], mode="eval").body if node.id in self.sources else node


def _bound(stmt: ast.stmt) -> set[str]:
    """The names ``stmt`` may bind: assignment targets, definitions, imports."""
    names = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


def _all_on_host(node: ast.AST, names: set[str]) -> bool:
    split = _Split(names, 0)
    split.visit(copy.deepcopy(node))
    return not split.evals


def holds(check: Check, values: list) -> bool:
    """Whether the assert holds for the sandbox's ``values`` of its test; False on any error."""
    env = {**check.env, **{f"_v{i}": v for i, v in enumerate(values)}}
    try:
        return bool(_eval(check.expr, env))
    except Exception:  # noqa: BLE001  (a value of the wrong type, a missing one, an overflow: the check fails)
        return False


def _eval(node: ast.AST, env: dict):
    """The host's evaluator: only the node types :func:`_on_host` admits, with sizes bounded."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id == "math":
            return math
        return TYPES[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = []
        for elt in node.elts:
            if isinstance(elt, ast.Starred):
                items.extend(_eval(elt.value, env))
            else:
                items.append(_eval(elt, env))
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                out.update(_eval(v, env))
            else:
                out[_eval(k, env)] = _eval(v, env)
        return out
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.BoolOp):
        value = None
        for operand in node.values:
            value = _eval(operand, env)
            if isinstance(node.op, ast.And) != bool(value):
                return value
        return value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, env)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env) else node.orelse, env)
    if isinstance(node, ast.Subscript):
        return _eval(node.value, env)[_eval(node.slice, env)]
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else _eval(p, env) for p in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Attribute):  # math.<name>, admitted by _on_host
        return getattr(math, node.attr)
    if isinstance(node, ast.Call):
        func = _eval(node.func, env) if isinstance(node.func, ast.Attribute) else SAFE_CALLS[node.func.id]
        args = []
        for a in node.args:
            args.extend(_eval(a.value, env)) if isinstance(a, ast.Starred) else args.append(_eval(a, env))
        return func(*args, **{k.arg: _eval(k.value, env) for k in node.keywords})
    raise TypeError(f"not evaluated on the host: {type(node).__name__}")


# The sandbox's side: how a value travels back. The encoder runs in the sandbox (the model can change it, which only
# changes values it could have returned anyway); the decoder runs on the host and trusts nothing.
ENCODER = r'''
def encode(v, depth=0):
    if depth > %d:
        raise ValueError("value nested too deep")
    t = type(v)
    if v is None: return ["N"]
    if t is bool: return ["b", v]
    if t is int: return ["i", str(v)]
    if t is float: return ["f", repr(v)]
    if t is complex: return ["c", repr(v)]
    if t is str: return ["s", v]
    if t is bytes: return ["y", v.hex()]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [encode(x, depth + 1) for x in v]]
    if t is dict: return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]]
    return ["?", t.__name__]
''' % MAX_DEPTH


class _Opaque:
    """A value that did not come back as data (an object of the model's class): equal to nothing."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


_CONTAINERS = {"l": list, "t": tuple, "S": set, "F": frozenset}


def decode(data, depth: int = 0):
    """A value from the sandbox's encoding; raises ValueError (or TypeError) on anything malformed."""
    if depth > MAX_DEPTH or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("malformed value")
    tag, rest = data[0], data[1:]
    if tag == "N":
        return None
    (payload,) = rest
    if tag == "b" and isinstance(payload, bool):
        return payload
    if tag == "i":
        return int(payload)  # past 4300 digits: ValueError (the interpreter's own guard)
    if tag == "f":
        return float(payload)
    if tag == "c":
        return complex(payload)
    if tag == "s" and isinstance(payload, str):
        return payload
    if tag == "y":
        return bytes.fromhex(payload)
    if tag in _CONTAINERS and isinstance(payload, list):
        return _CONTAINERS[tag](decode(x, depth + 1) for x in payload)
    if tag == "d" and isinstance(payload, list):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in payload}
    if tag == "?" and isinstance(payload, str):
        return _Opaque(payload[:100])
    raise ValueError("malformed value")


def decode_all(values) -> list | None:
    """The values of one test, or None if any is malformed."""
    try:
        return [decode(v) for v in values] if isinstance(values, list) else None
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None
