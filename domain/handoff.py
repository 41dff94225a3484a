"""Handing a customer to a human: the marker a Dify app puts in its answer to ask for it.

A customer asks with a keyword (domain/commands.py, CommandKind.HANDOFF). The AI app asks with a marker
anywhere in its answer (default `[[转人工]]`, also `[HANDOFF]`): the marker is never shown to the customer,
the rest of the answer is.

The answer is model output, so its cost must stay linear: markers are removed in one pass, and only when
that pass joins the halves of another marker (`[[转[[转人工]]人工]]`) does a second, stack-based pass run,
over at most NESTED_MARKERS_CAP characters (more than five WeCom messages can carry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_HANDOFF_MARKERS: tuple[str, ...] = ("[[转人工]]", "[HANDOFF]")
# When markers nest, the answer is cut to this many characters before they are unwound.
NESTED_MARKERS_CAP = 32 * 1024

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


@dataclass(frozen=True, slots=True)
class _Markers:
    pattern: re.Pattern[str]  # any marker, anywhere
    whole: re.Pattern[str]  # exactly one marker (fullmatch)
    lengths: tuple[int, ...]  # the markers' lengths, longest first
    last: frozenset[str]  # what a marker's last character may be (casefolded)


@lru_cache(maxsize=32)
def _compile(markers: tuple[str, ...]) -> _Markers | None:
    cleaned = sorted({m.strip() for m in markers if m.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    alternatives = "|".join(_pattern_for(m) for m in cleaned)
    last = {ch.casefold() for m in cleaned for ch in _EQUIVALENTS.get(m[-1], m[-1])}
    return _Markers(
        pattern=re.compile(alternatives, re.IGNORECASE),
        whole=re.compile(f"(?:{alternatives})", re.IGNORECASE),
        lengths=tuple(sorted({len(m) for m in cleaned}, reverse=True)),
        last=frozenset(last),
    )


def _unwind(line: str, markers: _Markers) -> str:
    """`line` without markers, including those that only form once an inner one is gone: each character
    goes on a stack, and a marker is popped as soon as it sits on top. Linear in the line's length."""
    out: list[str] = []
    for ch in line:
        out.append(ch)
        if ch.casefold() not in markers.last:
            continue
        for length in markers.lengths:
            if len(out) >= length and markers.whole.fullmatch("".join(out[-length:])):
                del out[-length:]
                break
    return "".join(out)


def take_handoff_marker(text: str, markers: Iterable[str] = DEFAULT_HANDOFF_MARKERS) -> MarkedAnswer:
    """Remove every marker from `text`; `handoff` tells whether there was one. Lines left empty by the
    removal go too, and the rest keeps its layout."""
    compiled = _compile(tuple(markers))
    if compiled is None or not compiled.pattern.search(text):
        return MarkedAnswer(text, False)
    pattern = compiled.pattern
    once = pattern.sub("", text)
    nested = pattern.search(once) is not None
    if nested:
        text = text[:NESTED_MARKERS_CAP]
    lines = []
    for line in text.split("\n"):
        stripped = pattern.sub("", line)
        if nested and pattern.search(stripped):  # removing one joined the halves of another
            stripped = _unwind(line, compiled)
        if stripped.strip() or stripped == line:
            lines.append(stripped.rstrip() if stripped != line else line)
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return MarkedAnswer(cleaned, True)


def marker_start(text: str, markers: Iterable[str] = DEFAULT_HANDOFF_MARKERS) -> int | None:
    """Where the first marker in `text` begins, or where its end could begin one that is still being
    written (`…[[转` of `[[转人工]]`); None when neither. For progressive replies: nothing from here on may be
    shown yet."""
    compiled = _compile(tuple(markers))
    if compiled is None:
        return None
    found = compiled.pattern.search(text)
    first = found.start() if found is not None else None
    cleaned = {m.strip() for m in markers if m.strip()}
    longest = max(len(m) for m in cleaned)
    for start in range(max(len(text) - longest + 1, 0), len(text)):
        if first is not None and start >= first:
            break
        tail = text[start:]
        if any(len(tail) < len(m) and _begins(tail, m) for m in cleaned):
            return start
    return first


def _begins(tail: str, marker: str) -> bool:
    """`tail` is how `marker` begins (full-width brackets and case as `take_handoff_marker` accepts)."""
    return all(
        ch.casefold() == want.casefold() or ch in _EQUIVALENTS.get(want, "")
        for ch, want in zip(tail, marker, strict=False)
    )
