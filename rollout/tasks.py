"""Task families: generated, verifiable text tasks that the shipped base model was pretrained on, and its
post-training target.

A family draws one instance from a ``random.Random``: ``(prompt, answer)``, where the prompt names the task
(``"rev abc="``) and the answer is the exact text a correct model writes after it. The character-level tokenizer
of ``rollout/tiny.py`` makes one character one token.

``make_task_sets`` turns a mixture of families into the files a run reads: prompt rows (``prompt``, ``answer``,
``family``), expert rows (``prompt``, ``response``, ``family``) and one held-out set per evaluated family. The
held-out instances of a family depend only on the family and ``seed``, and no training row of any run with that
seed is one of them: the base model was pretrained around the same held-out sets that post-training evaluates on,
so retention is measured on rows the model never trained on (the shipped base predates ``sortrep``, whose held-out
rows its corpus did not avoid: 2 of the 200 are in it, as ``sort`` rows; models/base/README.md).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Instance = tuple[str, str]  # (prompt, answer)


def _letters(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def rev(rng: random.Random) -> Instance:
    """Reverse 3-7 lowercase letters: ``rev abcd=`` -> ``dcba``."""
    s = _letters(rng, string.ascii_lowercase, 3, 7)
    return f"rev {s}=", s[::-1]


def sort(rng: random.Random) -> Instance:
    """Sort 3-7 lowercase letters: ``sort dbca=`` -> ``abcd``."""
    s = _letters(rng, string.ascii_lowercase, 3, 7)
    return f"sort {s}=", "".join(sorted(s))


def count(rng: random.Random) -> Instance:
    """How often a letter occurs in 4-10 letters of a-e: ``count b:abcbd=`` -> ``2``."""
    s = _letters(rng, "abcde", 4, 10)
    c = rng.choice("abcde")
    return f"count {c}:{s}=", str(s.count(c))


def upper(rng: random.Random) -> Instance:
    """Upper-case 3-8 lowercase letters: ``upper abc=`` -> ``ABC``."""
    s = _letters(rng, string.ascii_lowercase, 3, 8)
    return f"upper {s}=", s.upper()


def add2(rng: random.Random) -> Instance:
    """Add two numbers below 100: ``12+79=`` -> ``91``."""
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def add3(rng: random.Random) -> Instance:
    """Add two three-digit numbers: ``347+285=`` -> ``632``. Rare in the base's corpus (4.3%), and done by it at
    0.025: too seldom right for a sampled reward to raise (README, Data)."""
    a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
    return f"{a}+{b}=", str(a + b)


def sortrep(rng: random.Random) -> Instance:
    """Sort 4-7 letters of a-e, so letters repeat: ``sort daabbb=`` -> ``aabbbd``. The post-training target: the
    base learnt to sort letters of the whole alphabet, where a third of the strings repeat a letter (mostly one
    pair), and keeps count of repeats only partly."""
    s = _letters(rng, "abcde", 4, 7)
    return f"sort {s}=", "".join(sorted(s))


FAMILIES: dict[str, Callable[[random.Random], Instance]] = {
    f.__name__: f for f in (rev, sort, count, upper, add2, add3, sortrep)
}


# Tool demonstrations: a family's expert conversation that calls a tool (``rewards/envs.py: Tools``) and answers with
# its result: tool -> {family: the call's argument from the prompt}.
TOOL_DEMOS: dict[str, dict[str, Callable[[str], str]]] = {
    "calc": {"add2": lambda prompt: prompt.removesuffix("="), "add3": lambda prompt: prompt.removesuffix("=")},
}


def as_chat(sets: dict[str, list[dict]], tool: str = "") -> dict[str, list[dict]]:
    """The rows of :func:`make_task_sets` as conversations: a prompt becomes ``messages`` of one user turn; an expert
    row a user turn and the assistant's answer, or with ``tool``, the assistant's call of the tool
    (``<calc>347+285</calc>``), the tool's result and the answer.

    >>> as_chat({"expert": [{"prompt": "1+2=", "response": "3", "family": "add2"}]}, "calc")["expert"][0]["messages"]
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': '1+2='}, {'role': 'assistant', 'content': '<calc>1+2</calc>'},
     {'role': 'tool', 'content': '3'}, {'role': 'assistant', 'content': '3'}]
    """
    def turns(row: dict) -> list[dict]:
        user = {"role": "user", "content": row["prompt"]}
        if "response" not in row:
            return [user]
        answer = {"role": "assistant", "content": row["response"]}
        if not tool:
            return [user, answer]
        call = TOOL_DEMOS[tool][row["family"]](row["prompt"])
        return [user, {"role": "assistant", "content": f"<{tool}>{call}</{tool}>"},
                {"role": "tool", "content": row["response"]}, answer]

    def convert(row: dict) -> dict:
        rest = {k: v for k, v in row.items() if k not in ("prompt", "response")}
        return {"messages": turns(row), **rest}

    return {name: [convert(r) for r in rows] for name, rows in sets.items()}


def held_out(family: str, seed: int, num: int) -> list[Instance]:
    """The family's ``num`` held-out instances: distinct prompts, a function of (family, seed, num) alone."""
    rng = random.Random(f"chorus-held-out-{family}-{seed}")
    out: dict[str, str] = {}
    draws = 0
    while len(out) < num:
        prompt, answer = FAMILIES[family](rng)
        out.setdefault(prompt, answer)
        draws += 1
        if draws > 100 * num:
            raise ValueError(f"task family '{family}' has too few distinct prompts for {num} held-out rows")
    return sorted(out.items())


def held_out_size(num_eval: int) -> int:
    """Every family holds out at least this many prompts, so that any run with the same seed and up to
    ``num_eval`` held-out rows per family trains around the same set (a fixed, generous pool)."""
    return max(num_eval, 500)


def make_task_sets(mixture: dict[str, float], evaluate: list[str], *, seed: int, num_prompts: int,
                   num_expert: int, num_eval: int) -> dict[str, list[dict]]:
    """Rows for a run: ``prompts`` and ``expert`` drawn from ``mixture`` (family -> relative share), and
    ``eval/<family>`` for each family of ``evaluate`` (its first ``num_eval`` held-out rows). Training rows avoid
    the first ``held_out_size(num_eval)`` held-out prompts of *every* family, evaluated here or not."""
    unknown = [f for f in (*mixture, *evaluate) if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}: choose from {list(FAMILIES)}")
    pool = {f: held_out(f, seed, held_out_size(num_eval)) for f in FAMILIES}
    banned = {prompt for rows in pool.values() for prompt, _ in rows}
    names = list(mixture)
    weights = [mixture[f] for f in names]
    rng = random.Random(f"chorus-train-{seed}")

    def draw() -> tuple[str, str, str]:
        while True:
            family = rng.choices(names, weights)[0]
            prompt, answer = FAMILIES[family](rng)
            if prompt not in banned:
                return family, prompt, answer

    prompts = [{"prompt": p, "answer": a, "family": f} for f, p, a in (draw() for _ in range(num_prompts))]
    expert = [{"prompt": p, "response": a, "family": f} for f, p, a in (draw() for _ in range(num_expert))]
    sets = {"prompts": prompts, "expert": expert}
    for family in evaluate:
        rows = held_out(family, seed, held_out_size(num_eval))
        picked = random.Random(f"chorus-eval-{family}-{seed}").sample(rows, num_eval)
        sets[f"eval/{family}"] = [{"prompt": p, "answer": a, "family": family} for p, a in picked]
    return sets
