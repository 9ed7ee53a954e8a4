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
