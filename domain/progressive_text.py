"""How much of an answer still streaming may already be shown: up to a paragraph boundary that nothing later
can change.

The answer is Markdown from a model, rendered for WeChat piece by piece (application/progressive.py). A piece
is rendered on its own, so it ends only where rendering it alone reads as rendering it with the rest would:
after a blank line, outside a code fence and a reasoning block (`<think>`, `<thinking>`, `<details>`), before
a paragraph that starts flush (not indented, not a list item, which could continue a list). Nothing at or
after a reasoning block still open, a tag still being written (`<thi`) or a handoff marker (even half
written) counts: the customer must never see reasoning or a marker. Linear in the text looked at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from domain.handoff import DEFAULT_HANDOFF_MARKERS, marker_start

# A tag is at most this long (as the renderer assumes): `<` without `>` within it is not a tag being written.
_MAX_TAG = 512
_REASONING_TAG = re.compile(rf"<(/?)(thinking|think|details)\b[^<>]{{0,{_MAX_TAG}}}>", re.IGNORECASE)
_FENCE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")
# A line that may continue the block before a blank line: indented, or a list item.
_CONTINUES = re.compile(r"[ \t]|[-+*](?:[ \t]|$)|\d{1,9}[.)](?:[ \t]|$)")
# A line this long (or ended, or not starting like one) shows whether it starts a list item.
_LINE_KNOWN = 12
_MAY_START_ITEM = frozenset(" \t-+*0123456789")


def shown_until(text: str, start: int = 0, markers: Iterable[str] = DEFAULT_HANDOFF_MARKERS) -> int | None:
    """The last paragraph boundary after `start` (itself a boundary: the start of the text or a result of
    this function) up to which `text[start:]` may be rendered and shown; None when there is none yet."""
    limit = _hold_from(text, start, tuple(markers))
    reasoning = _reasoning_spans(text, start, limit)
    best: int | None = None
    fence = ""
    pos = start
    blank_before = False
    span = 0
    while pos < limit:
        newline = text.find("\n", pos, limit)
        end = newline if newline >= 0 else limit
        line = text[pos:end]
        while span < len(reasoning) and reasoning[span][1] <= pos:
            span += 1
        in_reasoning = span < len(reasoning) and reasoning[span][0] <= pos
        if not line.strip():
            blank_before = True
        else:
            if (
                blank_before
                and not fence
                and not in_reasoning
                and pos > start
                and (newline >= 0 or len(line) >= _LINE_KNOWN or line[0] not in _MAY_START_ITEM)
                and not _CONTINUES.match(line)
            ):
                best = pos
            blank_before = False
            if not in_reasoning:
                fence = _fence_after(line, fence)
        if newline < 0:
            break
        pos = newline + 1
    return best


def _fence_after(line: str, fence: str) -> str:
    """The open fence after `line` ("" when none): a fence closes with a run of its own character at
    least as long."""
    found = _FENCE.match(line)
    if found is None:
        return fence
    run = found.group(1)
    if not fence:
        return run
    if run[0] == fence[0] and len(run) >= len(fence) and not line[found.end() :].strip():
        return ""
    return fence


def _hold_from(text: str, start: int, markers: tuple[str, ...]) -> int:
    """Where the part that must wait begins: an open reasoning block, a tag still being written, the line
    of a handoff marker (whole or begun)."""
    limit = len(text)
    open_at = _open_reasoning(text, start)
    if open_at is not None:
        limit = open_at
    bracket = text.rfind("<", start, limit)
    if bracket >= 0 and ">" not in text[bracket:limit] and limit - bracket <= _MAX_TAG + 16:
        limit = bracket
    marker = marker_start(text[start:limit], markers)
    if marker is not None:
        limit = text.rfind("\n", start, start + marker) + 1 or start
    return max(limit, start)


def _open_reasoning(text: str, start: int) -> int | None:
    """Where a reasoning block still open at the end of `text` begins (None when all are closed)."""
    return _scan_reasoning(text, start, len(text))[1]


def _reasoning_spans(text: str, start: int, limit: int) -> list[tuple[int, int]]:
    """The closed reasoning blocks in `text[start:limit]`, as (begin, end) positions, in order."""
    return _scan_reasoning(text, start, limit)[0]


def _scan_reasoning(text: str, start: int, limit: int) -> tuple[list[tuple[int, int]], int | None]:
    """One pass over the reasoning tags in `text[start:limit]`: the closed blocks as (begin, end), and where
    a block still open at `limit` begins (None when all are closed)."""
    spans: list[tuple[int, int]] = []
    open_name, open_at, depth = "", 0, 0
    for tag in _REASONING_TAG.finditer(text, start, limit):
        closing, name = tag.group(1) == "/", tag.group(2).lower()
        if not open_name:
            if not closing:
                open_name, open_at, depth = name, tag.start(), 1
            continue
        if name != open_name:
            continue
        if name == "details":  # <details> nests; <think> does not
            depth += -1 if closing else 1
        elif closing:
            depth = 0
        if depth == 0:
            open_name = ""
            spans.append((open_at, tag.end()))
    return spans, (open_at if open_name else None)
