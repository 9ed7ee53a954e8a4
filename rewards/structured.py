"""Structured output: a JSON answer scored as separate components, weighted into one score (as in RL-Struct).

Components, each in [0, 1]:
- ``parses``: the response holds a JSON value (its last fenced ```json block, or its first ``{...}``/``[...]``
  span, or all of it);
- ``schema``: that value validates against the row's JSON Schema;
- ``keys``: share of the schema's top-level ``required`` keys present (1 when it requires none);
- ``content``: share of the reference answer's leaf fields that the response gets right (strings compared after
  stripping and case-folding, numbers within 1e-6, booleans and null exactly).

Model output is parsed within bounds, so that a hostile response scores 0 alone instead of failing its batch: a
response over ``MAX_CHARS``, JSON nested deeper than ``MAX_DEPTH``, an integer of more than ``MAX_INT_DIGITS``
digits, ``NaN``/``Infinity`` or a number beyond float's range does not parse (``parses`` 0, score 0).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re

import jsonschema

from rewards.registry import register

log = logging.getLogger("chorus.rewards")

WEIGHTS = {"parses": 0.1, "schema": 0.3, "keys": 0.2, "content": 0.4}
# The fence line's info string is bounded: [^\n]* scanned to the end of the text from every "```json" of a line that
# never ends (quadratic: 14k of them took a second).
_JSON_FENCE = re.compile(r"```[ \t]*+json[^\n]{0,200}+\n(.*?)```", re.DOTALL | re.IGNORECASE)
MAX_CHARS = 100_000  # longer responses are not parsed at all: a flood of output is not structured output
MAX_DEPTH = 64  # deeper values would exhaust Python's stack in the validator (a recursive schema: ~200 levels)
MAX_INT_DIGITS = 308  # a longer integer overflows float comparisons (a 5000-digit one fails int() itself)


def _int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is beyond float's range")
    return value


def _constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _depth(value) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                todo.append((child, depth + 1))
        deepest = max(deepest, depth if isinstance(item, (dict, list)) else 0)
    return deepest


def parse_bounded(text: str):
    """``json.loads(text)`` within the module docstring's bounds; raises ``ValueError`` beyond them."""
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:  # deeper than the C parser goes
        raise ValueError("nested too deeply") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    return value


def extract_json(response: str):
    """The JSON value in ``response`` (parsed by :func:`parse_bounded`); raises ``ValueError`` when there is
    none."""
    if len(response) > MAX_CHARS:
        raise ValueError(f"response of {len(response)} characters")
    candidates = _JSON_FENCE.findall(response)[-1:]
    starts = [i for i in (response.find("{"), response.find("[")) if i >= 0]
    if starts:
        start = min(starts)
        end = response.rfind("}" if response[start] == "{" else "]")
        if end > start:
            candidates.append(response[start:end + 1])
    candidates.append(response)
    for text in candidates:
        try:
            return parse_bounded(text)
        except ValueError:  # JSONDecodeError too
            continue
    raise ValueError("no JSON value")


def _leaves(value, path=()):
    """(path, leaf) for every scalar in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path, value


def _lookup(value, path):
    for step in path:
        if isinstance(step, int) and isinstance(value, list) and step < len(value):
            value = value[step]
        elif isinstance(step, str) and isinstance(value, dict) and step in value:
            value = value[step]
        else:
            raise KeyError(path)
    return value


def _same_leaf(got, want) -> bool:
    if isinstance(want, bool) or want is None or isinstance(got, bool):
        return got is want or got == want and type(got) is type(want)
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(want, str) and isinstance(got, str):
        return got.strip().casefold() == want.strip().casefold()
    return False


def content_score(got, want) -> float:
    """Share of ``want``'s leaf fields that ``got`` has, at the same path, with an equal value."""
    leaves = list(_leaves(want))
    if not leaves:
        return float(got == want)
    hits = 0
    for path, leaf in leaves:
        try:
            hits += _same_leaf(_lookup(got, path), leaf)
        except KeyError:
            pass
    return hits / len(leaves)


def _as_json(value):
    return json.loads(value) if isinstance(value, str) else value


@functools.lru_cache(maxsize=256)
def _validator(schema_text: str):
    """A checked validator of the schema ``schema_text`` (canonical JSON): rows usually share a few schemas, and
    checking one costs more than scoring a response against it. Raises ``jsonschema.SchemaError``."""
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def score_one(response: str, validator, answer, weights: dict[str, float]) -> dict[str, float]:
    parts = dict.fromkeys(WEIGHTS, 0.0)
    try:
        value = extract_json(response)
    except ValueError:
        return {"score": 0.0, **parts}
    parts["parses"] = 1.0
    parts["schema"] = float(validator.is_valid(value))
    schema = validator.schema
    required = schema.get("required", []) if isinstance(schema, dict) else []
    parts["keys"] = (sum(key in value for key in required) / len(required) if isinstance(value, dict)
                     else 0.0) if required else 1.0
    parts["content"] = content_score(value, answer) if answer is not None else parts["schema"]
    total = sum(weights[k] * parts[k] for k in WEIGHTS) / sum(weights.values())
    return {"score": total, **parts}


@register("json_schema")
def json_schema(prompts: list[str], responses: list[str], schema: list, answer: list | None = None, *,
                weights: dict[str, float] | None = None, **_) -> list[dict[str, float] | None]:
    """Structured output against the row's ``schema`` (a JSON Schema, as an object or a JSON string) and, when the
    row has one, its reference ``answer`` (a JSON value or string). Returns, per response, the weighted ``score``
    and the four components; ``weights`` (config ``args``) replaces the defaults key by key. Without an answer,
    ``content`` is the schema's verdict.

    >>> json_schema([""], ['{"n": 2}'], schema=[{"type": "object", "required": ["n"]}], answer=[{"n": 2}])[0]["score"]
    1.0
    """
    w = {**WEIGHTS, **(weights or {})}
    if set(w) != set(WEIGHTS):
        raise ValueError(f"json_schema weights: unknown components {sorted(set(w) - set(WEIGHTS))}")
    answers = answer if answer is not None else [None] * len(responses)
    out = []
    for response, row_schema, row_answer in zip(responses, schema, answers):
        try:
            validator = _validator(json.dumps(_as_json(row_schema), sort_keys=True))
            row_answer = _as_json(row_answer)
        except (json.JSONDecodeError, jsonschema.SchemaError) as exc:  # the row's fault, not the model's
            log.warning("json_schema: the row's schema or answer is broken: %s", str(exc).splitlines()[0])
            out.append(None)
            continue
        try:
            out.append(score_one(response, validator, row_answer, w))
        except (RecursionError, OverflowError, ValueError) as exc:  # a value past what the validator handles
            log.warning("json_schema: a response broke the validator (%s: %s); it scores 0", type(exc).__name__,
                        str(exc)[:200])
            out.append({"score": 0.0, **dict.fromkeys(WEIGHTS, 0.0)})
    return out
