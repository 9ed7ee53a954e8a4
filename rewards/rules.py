"""Verifiable rule rewards."""

from __future__ import annotations

import re

from rewards.registry import register


def _normalize(text: str, *, strip: bool, lowercase: bool, collapse_spaces: bool) -> str:
    if strip:
        text = text.strip()
    if lowercase:
        text = text.lower()
    if collapse_spaces:
        text = re.sub(r"\s+", " ", text)
    return text


@register("exact_match")
def exact_match(prompts: list[str], responses: list[str], answer: list[str], *, strip: bool = True,
                lowercase: bool = False, collapse_spaces: bool = False, **_) -> list[float]:
    """1.0 where the response equals the row's ``answer`` after normalisation, else 0.0.

    >>> exact_match(["ab="], [" ba"], answer=["ba"])
    [1.0]
    """
    opts = dict(strip=strip, lowercase=lowercase, collapse_spaces=collapse_spaces)
    return [float(_normalize(r, **opts) == _normalize(a, **opts)) for r, a in zip(responses, answer)]


@register("char_match")
def char_match(prompts: list[str], responses: list[str], answer: list[str], **_) -> list[float]:
    """Share of the answer's characters the response has at the same position (after stripping spaces at both
    ends): partial credit, so that samples of an untrained model already differ in reward and group-relative
    advantages are not all zero. Extra characters beyond the answer earn nothing.

    >>> char_match(["abc="], [" cbx"], answer=["cba"])
    [0.6666666666666666]
    """
    return [sum(a == b for a, b in zip(r.strip(), ans)) / max(len(ans), 1) for r, ans in zip(responses, answer)]


_CHOICE_MARKERS = (
    # "Answer: B", "the answer is (c)"; a lower-case letter only in brackets ("the answer is a ..." picks nothing).
    # Possessive \s*+: with "\s*(?:is|:)?\s*" every split of a long run of spaces after "answer" was tried (quadratic:
    # "Answer" and 100k spaces took minutes).
    re.compile(r"[Aa]nswer\s*+(?:(?:is|:)\s*+)?(?:[(\[]([A-Za-z])[)\]]|([A-Z])\b(?!['-]))"),
    re.compile(r"^\s*[(\[]?([A-Za-z])[)\].:]?\s*$"),  # the whole response is "B", "(b)", "B." or "B)"
    re.compile(r"^\s*[(\[]?([A-Z])[)\].:]\s"),  # it starts with "B) ..." or "B. ..."
)


def picked_option(response: str) -> str | None:
    """The option letter a response picks: the last "answer: X", else a bare letter, else a leading "X)".

    >>> picked_option("I think the answer is (c).")
    'C'
    """
    for marker in _CHOICE_MARKERS:
        found = marker.findall(response)
        if found:
            last = found[-1]
            return "".join(last).upper() if isinstance(last, tuple) else last.upper()
    return None


def picked_label(response: str, labels: list[str]) -> str | None:
    """The one label of ``labels`` the response names (case-insensitive, whole words, so "non-negative" does not name
    "negative"); None if it names none or several."""
    text = response.strip().casefold()
    exact = [label for label in labels if text == label.casefold()]
    if exact:
        return exact[0]
    named = [label for label in labels if re.search(rf"(?<![\w-]){re.escape(label.casefold())}(?![\w-])", text)]
    return named[0] if len(named) == 1 else None


@register("choice")
def choice(prompts: list[str], responses: list[str], answer: list[str], *, labels: list[str] | None = None,
           **_) -> list[float]:
    """Multiple choice or a class label: 1.0 where the option the response picks is the row's ``answer``.

    Without ``labels`` the answer is an option letter (``"B"``) and the response's pick is its last
    "answer: X", else a response that is only a letter. With ``labels`` (config ``args``; e.g. ``[positive,
    negative, neutral]``) the pick is the one label the response names; naming several picks none.

    >>> choice(["q"] * 3, ["Answer: B", "b", "A or B"], answer=["B", "B", "B"])
    [1.0, 1.0, 0.0]
    """
    if labels:
        return [float((picked_label(r, labels) or "").casefold() == str(a).casefold()) for r, a in
                zip(responses, answer)]
    return [float(picked_option(r) == str(a).strip().upper()) for r, a in zip(responses, answer)]


@register("length_penalty")
def length_penalty(prompts: list[str], responses: list[str], *, target: int = 200, limit: int = 400,
                   unit: str = "words", **_) -> list[float]:
    """A length term to weigh in beside the task's reward (as in TLDR): 1.0 up to ``target``, falling linearly to
    0.0 at ``limit`` and beyond. ``unit`` is ``words`` (whitespace-separated) or ``chars``. With a weight w the
    term adds at most w, so a correct answer still beats a short wrong one when w < the task reward.

    >>> length_penalty(["q"] * 3, ["a b", "a b c d", "a b c d e f"], target=2, limit=6)
    [1.0, 0.5, 0.0]
    """
    if unit not in ("words", "chars"):
        raise ValueError(f"length_penalty: unit must be 'words' or 'chars', not {unit!r}")
    if not 0 <= target < limit:
        raise ValueError(f"length_penalty: need 0 <= target < limit, got target={target}, limit={limit}")
    sizes = [len(r.split()) if unit == "words" else len(r) for r in responses]
    return [min(1.0, max(0.0, 1.0 - (n - target) / (limit - target))) for n in sizes]
