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
