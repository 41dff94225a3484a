"""Handing a customer to a human: the marker a Dify app puts in its answer to ask for it.

A customer asks with a keyword (domain/commands.py, CommandKind.HANDOFF). The AI app asks with a marker
anywhere in its answer (default `[[转人工]]`, also `[HANDOFF]`): the marker is never shown to the customer,
the rest of the answer is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_HANDOFF_MARKERS: tuple[str, ...] = ("[[转人工]]", "[HANDOFF]")

# A model may write brackets full-width; the marker means the same.
_EQUIVALENTS = {"[": "[［【", "]": "]］】", "(": "(（", ")": ")）"}


@dataclass(frozen=True, slots=True)
class MarkedAnswer:
    """An answer with its handoff markers taken out."""

    text: str
    handoff: bool


def _pattern_for(marker: str) -> str:
    parts = []
    for ch in marker:
        equivalents = _EQUIVALENTS.get(ch)
        parts.append(f"[{re.escape(equivalents)}]" if equivalents else re.escape(ch))
    return "".join(parts)


@lru_cache(maxsize=32)
def _compile(markers: tuple[str, ...]) -> re.Pattern[str] | None:
    cleaned = sorted({m.strip() for m in markers if m.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    return re.compile("|".join(_pattern_for(m) for m in cleaned), re.IGNORECASE)


def take_handoff_marker(text: str, markers: Iterable[str] = DEFAULT_HANDOFF_MARKERS) -> MarkedAnswer:
    """Remove every marker from `text`; `handoff` tells whether there was one. Lines left empty by the
    removal go too, and the rest keeps its layout."""
    pattern = _compile(tuple(markers))
    if pattern is None or not pattern.search(text):
        return MarkedAnswer(text, False)
    lines = []
    for line in text.split("\n"):
        stripped = line
        while pattern.search(stripped):  # removing one may join the halves of another
            stripped = pattern.sub("", stripped)
        if stripped.strip() or stripped == line:
            lines.append(stripped.rstrip() if stripped != line else line)
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return MarkedAnswer(cleaned, True)
