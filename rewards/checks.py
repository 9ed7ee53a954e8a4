"""``assert`` tests of ``code_exec``, checked where the model's code cannot reach.

A test such as ``assert sorted(f([3, 1])) == [1, 3]`` runs the model's code (``f``) and then compares. If the
comparison ran in the model's process, the model could forge it: replace a builtin, patch the harness, print a
verdict and exit. So the host splits each assert (:func:`plan`) into

- the parts that need the model's code, run in the sandbox after the solution: here ``f([3, 1])``, whose value
  comes back as data (:data:`ENCODER`, :func:`decode`: numbers, strings, bytes, None, lists, tuples, sets, dicts;
  numpy values, iterators and views as the lists they hold);
- the parts that need Python but none of the model's names (``[i * i for i in range(3)]``, ``"AB".lower()``): run in
  a sandbox of their own that never loads the solution;
- the rest, evaluated by the host (:func:`holds`) over those values: literals, arithmetic, comparisons, ``and`` /
  ``or`` / ``not``, subscripts, names the tests bind to literals, ``math`` (also when the tests import from it) and
  a few pure builtins (``len``, ``sorted``, ``abs`` ...; :data:`SAFE_CALLS`).

No expected value enters the model's sandbox (a name the tests bind to a literal, ``expected = [1, 3]``, is sent
there only if code there reads it), so the values it returns pass only by being right: whatever the model's process
does, it acts like some implementation of ``f``. Statements other than top-level asserts (imports, helper
definitions, ``s = Stack()``) run in the model's sandbox in order. Two shapes would be decided in the model's
process and are refused (:class:`Uncheckable`; the row is not scored, a counted failure): an assert nested inside
another statement (a loop, a function), and a helper the tests define or import called with the model's output and
an expected value (``check(f(1), 2)``): write the comparison in the assert itself.

    >>> p = plan(["x = 4", "want = [1, 2]", "assert f(x) - 1 == x", "assert g() == want"])
    >>> p.steps  # want never reaches the sandbox; x does, as f's input
    [[], [], [['exec', 'x = 4'], ['eval', 'f(x)']], [['eval', 'g()']]]
    >>> holds(p.checks[2][0], [5], []), holds(p.checks[3][0], [[1, 2]], [])
    (True, True)
"""

from __future__ import annotations

import ast
import builtins
import copy
import math
from dataclasses import dataclass, field

_BUILTINS = frozenset(dir(builtins))

MAX_DEPTH = 64  # of a returned value's nesting
MAX_ITEMS = 1_000_000  # sizes the host builds from returned values (a list repeated, a power's digits)


class Uncheckable(ValueError):
    """A test whose verdict could only be reached in the model's process."""


@dataclass
class Check:
    """One top-level assert: ``expr`` with the sandboxes' parts replaced by ``_vK`` (the K-th value the model's
    sandbox returns for its test) and ``_rK`` (the K-th of the reference sandbox), evaluated in ``env`` (the names
    the tests bound to literals before it, and functions imported from math)."""
    expr: ast.expr
    env: dict


@dataclass
class Plan:
    steps: list[list[list[str]]] = field(default_factory=list)  # per test: ["exec" | "eval", source], in order
    checks: list[list[Check]] = field(default_factory=list)  # per test: its asserts
    reference: list[list[str]] = field(default_factory=list)  # the steps of the parts run without the solution


def _big(x, cap) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and abs(x) > cap


def _mul(a, b):
    if (isinstance(a, (str, bytes, list, tuple)) and _big(b, MAX_ITEMS // max(len(a), 1))) or \
            (isinstance(b, (str, bytes, list, tuple)) and _big(a, MAX_ITEMS // max(len(b), 1))):
        raise OverflowError("repetition too large")
    return a * b


def _pow(a, b, *mod):
    if _big(b, 10_000) or (isinstance(a, int) and isinstance(b, int) and b > 0 and a.bit_length() * b > 1 << 20):
        raise OverflowError("power too large")
    return pow(a, b, *mod)


def _lshift(a, b):
    if _big(b, 1 << 20):
        raise OverflowError("shift too large")
    return a << b


def _bounded(fn, cap=10_000):
    """``fn`` (factorial, comb, perm) refusing arguments whose result would take the host long to build."""
    def call(*args):
        if any(_big(a, cap) for a in args):
            raise OverflowError(f"{fn.__name__} argument too large")
        return fn(*args)
    return call


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
MATH = {name: getattr(math, name) for name in (
    "isclose", "sqrt", "floor", "ceil", "fabs", "isnan", "isinf", "isfinite", "inf", "nan", "pi", "e", "log",
    "log2", "log10", "exp", "gcd", "prod", "fsum")}
MATH |= {name: _bounded(getattr(math, name)) for name in ("factorial", "comb", "perm")}
_SYNTAX = (ast.expr_context, ast.operator, ast.boolop, ast.cmpop, ast.unaryop, ast.keyword, ast.comprehension,
           ast.arguments, ast.arg)


def _on_host(node: ast.AST, env: dict) -> bool:
    """Whether the host evaluates ``node`` itself (its children are looked at separately); ``env``: the host's
    names."""
    if isinstance(node, (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Compare, ast.BoolOp,
                         ast.UnaryOp, ast.IfExp, ast.Subscript, ast.Slice, ast.Starred)):
        return True
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINOPS
    if isinstance(node, ast.Name):
        return node.id in env or node.id in SAFE_CALLS or node.id == "math"
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in MATH
    if isinstance(node, ast.Call):
        func, args = node.func, [*node.args, *(k.value for k in node.keywords)]
        if isinstance(func, ast.Name):  # a safe builtin the tests did not rebind, or a function of math they import
            host_func = callable(env[func.id]) if func.id in env else func.id in SAFE_CALLS
        else:
            host_func = isinstance(func, ast.Attribute) and _on_host(func, env)
        return host_func and not any(isinstance(a, ast.Lambda) for a in args)
    return False


def _free_names(node: ast.AST) -> set[str]:
    """The names ``node`` reads that it does not bind itself (a comprehension's or a lambda's variables)."""
    loads, bound = set(), set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
    return loads - bound


class _Split(ast.NodeTransformer):
    """Replace each maximal part the host cannot evaluate by ``_vK`` (the model's sandbox: ``model``) or, if it
    reads no name but Python's builtins and the host's, ``_rK`` (the reference sandbox: ``reference``)."""

    def __init__(self, env: dict, n_model: int, n_reference: int):
        self.env, self.model, self.reference = env, [], []
        self.n_model, self.n_reference = n_model, n_reference

    def visit(self, node):
        if isinstance(node, ast.Call) and _on_host(node, self.env):  # the function's name is not a value
            node.args = [self.visit(a) for a in node.args]
            for k in node.keywords:
                k.value = self.visit(k.value)
            return node
        if isinstance(node, _SYNTAX) or _on_host(node, self.env):
            return self.generic_visit(node)
        if _free_names(node) <= _BUILTINS | self.env.keys():
            self.reference.append(node)
            return ast.Name(id=f"_r{self.n_reference + len(self.reference) - 1}", ctx=ast.Load())
        self.model.append(node)
        return ast.Name(id=f"_v{self.n_model + len(self.model) - 1}", ctx=ast.Load())


_MUTABLE = (list, dict, set, bytearray)


def plan(tests: list[str]) -> Plan:
    """The sandboxes' steps and the host's checks for ``tests`` (they share one namespace, as in the sandbox); see
    the module docstring. Raises :class:`Uncheckable` (naming the test) or SyntaxError."""
    out = Plan()
    env, sources, helpers = {}, {}, set()  # the host's names, their literal source, the tests' own helpers
    sent, sent_reference = set(), {}  # the host's names each sandbox has (the reference: with which source)

    def send(nodes: list[ast.AST], steps: list) -> None:
        """Assign, in the model's sandbox, the host's names ``nodes`` read that it does not have yet. A mutable
        value is the sandbox's from then on (code there may change it in place)."""
        for name in sorted(set().union(*(_free_names(n) for n in nodes)) & set(sources) - sent):
            steps.append(["exec", f"{name} = {sources[name]}"])
            sent.add(name)
            if isinstance(env[name], _MUTABLE):
                del env[name], sources[name]

    def send_reference(nodes: list[ast.AST]) -> None:
        """Likewise in the reference sandbox, where a name is assigned again when the tests rebound it."""
        for name in sorted(set().union(*(_free_names(n) for n in nodes)) & set(sources)):
            if sent_reference.get(name) != sources[name]:
                out.reference.append(["exec", f"{name} = {sources[name]}"])
                sent_reference[name] = sources[name]

    for i, test in enumerate(tests):
        steps, checks, n_model = [], [], 0
        for stmt in ast.parse(test, f"test {i + 1}").body:
            if isinstance(stmt, ast.Assert):
                split = _Split(env, n_model, sum(kind == "eval" for kind, _ in out.reference))
                expr = split.visit(ast.parse(ast.unparse(stmt.test), mode="eval").body)
                _refuse_helper_comparisons(split.model, helpers, env, i)
                send_reference(split.reference)
                out.reference += [["eval", ast.unparse(node)] for node in split.reference]
                send(split.model, steps)
                steps += [["eval", ast.unparse(node)] for node in split.model]
                checks.append(Check(expr, dict(env)))
                n_model += len(split.model)
            elif any(isinstance(node, ast.Assert) for node in ast.walk(stmt)):
                raise Uncheckable(f"test {i + 1} has an assert inside a {type(stmt).__name__.lower()} statement: "
                                  "it would be decided in the model's process, where it can be forged; write each "
                                  "check as a top-level assert")
            elif not _bind_on_host(stmt, env, sources, sent):
                send([stmt], steps)
                steps.append(["exec", ast.unparse(stmt)])
                for name in _bound(stmt):  # names the sandbox (re)binds are no longer the host's to know
                    env.pop(name, None), sources.pop(name, None), sent.discard(name)
                helpers |= _defined(stmt)
                env.update(_math_imports(stmt))
        out.steps.append(steps)
        out.checks.append(checks)
    return out


def _bind_on_host(stmt: ast.stmt, env: dict, sources: dict, sent: set) -> bool:
    """A name bound to a literal (``expected = [1, 2]``) becomes the host's; True if ``stmt`` was one."""
    if not (isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets)):
        return False
    split = _Split(env, 0, 0)
    split.visit(copy.deepcopy(stmt.value))
    if split.model or split.reference:
        return False
    try:
        value = _eval(stmt.value, env)
    except Exception:  # noqa: BLE001  (not the host's after all: the sandbox runs it)
        return False
    source = ast.unparse(_Inline(sources).visit(copy.deepcopy(stmt.value)))
    for target in stmt.targets:
        env[target.id], sources[target.id] = value, source
        sent.discard(target.id)
    return True


def _refuse_helper_comparisons(parts: list[ast.AST], helpers: set[str], env: dict, i: int) -> None:
    """A helper of the tests' own (defined or imported by them) given the model's output and an expected value runs
    in the model's process, which can replace it: such a check is refused."""
    for call in (n for part in parts for n in ast.walk(part) if isinstance(n, ast.Call)):
        base = call.func
        while isinstance(base, ast.Attribute):  # np.testing.assert_allclose: the helper is np's
            base = base.value
        if isinstance(base, ast.Name) and base.id in helpers:
            args = [*call.args, *(k.value for k in call.keywords)]
            needs_model = [_free_names(a) - _BUILTINS - env.keys() for a in args]
            if any(needs_model) and not all(needs_model):
                raise Uncheckable(f"test {i + 1} calls {ast.unparse(call.func)}() with the model's output and an "
                                  f"expected value: the helper runs in the model's process, where it can be "
                                  f"replaced; write the comparison in the assert (math.isclose and the builtins are "
                                  f"the host's)")


def _math_imports(stmt: ast.stmt) -> dict:
    """``from math import isclose [as close]`` binds the host's math functions too."""
    if isinstance(stmt, ast.ImportFrom) and stmt.module == "math":
        return {a.asname or a.name: MATH[a.name] for a in stmt.names if a.name in MATH}
    return {}


class _Inline(ast.NodeTransformer):
    """The host's names in a literal replaced by their own literal source."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources

    def visit_Name(self, node):
        return ast.parse(self.sources[node.id], mode="eval").body if node.id in self.sources else node


def _bound(stmt: ast.stmt) -> set[str]:
    """The names ``stmt`` may bind: assignment targets, definitions, imports."""
    names = _defined(stmt)
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


def _defined(stmt: ast.stmt) -> set[str]:
    """The functions, classes and imports ``stmt`` defines: the tests' own helpers."""
    names = set()
    for node in ast.walk(stmt):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


class _Raised:
    """A part that raised in its sandbox: evaluating it raises, as it would have in the assert; a check that never
    reaches it (``x == [] or x[0] == 1``) does not."""

    def __init__(self, name: str):
        self.name = name


def holds(check: Check, model: list, reference: list) -> bool:
    """Whether the assert holds for the values the two sandboxes returned; False on any error."""
    env = {**check.env, **{f"_v{i}": v for i, v in enumerate(model)},
           **{f"_r{i}": v for i, v in enumerate(reference)}}
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
            value = env[node.id]
            if isinstance(value, _Raised):
                raise RuntimeError(f"the sandbox raised {value.name}")
            return value
        return math if node.id == "math" else SAFE_CALLS[node.id]
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
        return MATH[node.attr]
    if isinstance(node, ast.Call):
        func = _eval(node.func, env)
        args = []
        for a in node.args:
            args.extend(_eval(a.value, env)) if isinstance(a, ast.Starred) else args.append(_eval(a, env))
        return func(*args, **{k.arg: _eval(k.value, env) for k in node.keywords})
    raise TypeError(f"not evaluated on the host: {type(node).__name__}")


# How a value travels back. The encoder runs in the sandbox (the model can change it, which only changes values its
# functions could have returned anyway); the decoder runs on the host and trusts nothing. Subclasses travel as
# their base (a Counter as a dict, a namedtuple as a tuple), numpy values as the Python values they hold, iterators
# and views as lists; ints in hex, which no digit limit applies to.
ENCODER = r'''
import collections.abc as _abc
def encode(v, depth=0):
    if depth > %d:
        raise ValueError("value nested too deep")
    if hasattr(v, "tolist") and type(v).__module__ == "numpy":
        v = v.tolist()
    if v is None: return ["N"]
    if isinstance(v, bool): return ["b", bool(v)]
    if isinstance(v, int): return ["i", hex(int(v))]
    if isinstance(v, float): return ["f", repr(float(v))]
    if isinstance(v, complex): return ["c", repr(complex(v))]
    if isinstance(v, str): return ["s", str(v)]
    if isinstance(v, (bytes, bytearray)): return ["y", bytes(v).hex()]
    if isinstance(v, _abc.Mapping):
        return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]]
    for kind, tag in ((tuple, "t"), (frozenset, "F"), (_abc.KeysView, "l"), (_abc.ValuesView, "l"),
                      (_abc.ItemsView, "l"), (_abc.Set, "S"), (list, "l"), (_abc.Iterator, "l"), (_abc.Sequence, "l")):
        if isinstance(v, kind):
            return [tag, [encode(x, depth + 1) for x in v]]
    return ["?", type(v).__name__]
''' % MAX_DEPTH


class _Opaque:
    """A value that did not come back as data (an object of the model's class): equal to nothing."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


_CONTAINERS = {"l": list, "t": tuple, "S": set, "F": frozenset}
MAX_SET = 10_000  # a set or dict past this whose items collide in hash is refused: building it would be quadratic


def _hashed(items: list) -> list:
    if len(items) > MAX_SET and len({hash(x) for x in items}) < len(items) // 2:
        raise ValueError("a set of colliding hashes")
    return items


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
    if tag == "i" and isinstance(payload, str):
        return int(payload, 16)
    if tag == "f":
        return float(payload)
    if tag == "c":
        return complex(payload)
    if tag == "s" and isinstance(payload, str):
        return payload
    if tag == "y":
        return bytes.fromhex(payload)
    if tag in ("l", "t") and isinstance(payload, list):
        return _CONTAINERS[tag](decode(x, depth + 1) for x in payload)
    if tag in ("S", "F") and isinstance(payload, list):
        return _CONTAINERS[tag](_hashed([decode(x, depth + 1) for x in payload]))
    if tag == "d" and isinstance(payload, list):
        pairs = [(decode(k, depth + 1), decode(v, depth + 1)) for k, v in payload]
        _hashed([k for k, _ in pairs])
        return dict(pairs)
    if tag == "?" and isinstance(payload, str):
        return _Opaque(payload[:100])
    if tag == "!" and isinstance(payload, str):
        return _Raised(payload[:100])
    raise ValueError("malformed value")


def decode_all(values) -> list | None:
    """The values of one test, or None if any is malformed."""
    try:
        return [decode(v) for v in values] if isinstance(values, list) else None
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None
