"""The welcome a customer gets on entering a session (kf `send_msg_on_event` with the welcome_code).

The configured text wins; otherwise the AI app's opening statement, with its suggested questions as a
menu of click items the customer can tap (a tap arrives as an ordinary text message). Limits:
docs/wecom-kf.md §6.3
(msgmenu head ≤1024 bytes, ≤10 items, click content ≤128 bytes; text ≤2048 bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from domain.replies import TEXT_LIMIT_BYTES, split_reply, utf8_len

MENU_HEAD_MAX_BYTES = 1024
MENU_MAX_ITEMS = 10
CLICK_CONTENT_MAX_BYTES = 128
_ELLIPSIS = "…"


@dataclass(frozen=True, slots=True)
class Welcome:
    """A text, or a msgmenu headed by `text` when `menu` holds (id, content) click items."""

    text: str
    menu: tuple[tuple[str, str], ...] = ()


def _fit(text: str, max_bytes: int) -> str:
    """At most `max_bytes`, cut at a natural boundary when possible, marked with an ellipsis when cut."""
    parts = split_reply(text, max_bytes=max_bytes, max_parts=1, truncation_notice=_ELLIPSIS)
    return parts[0] if parts else ""


def _fit_short(text: str, max_bytes: int) -> str:
    text = " ".join(text.split())
    if utf8_len(text) <= max_bytes:
        return text
    room = max_bytes - utf8_len(_ELLIPSIS)
    out, size = [], 0
    for ch in text:
        n = utf8_len(ch)
        if size + n > room:
            break
        out.append(ch)
        size += n
    return "".join(out).rstrip() + _ELLIPSIS


def menu_items(questions: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Suggested questions as click items: blank and repeated ones dropped, at most 10, each ≤128 bytes."""
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    for question in questions:
        content = _fit_short(question, CLICK_CONTENT_MAX_BYTES)
        if not content or content in seen:
            continue
        seen.add(content)
        items.append((f"q{len(items) + 1}", content))
        if len(items) == MENU_MAX_ITEMS:
            break
    return tuple(items)


def compose_welcome(
    *, configured: str, opening_statement: str, suggested_questions: Sequence[str] = ()
) -> Welcome | None:
    """None when there is nothing to say (no configured text and no opening statement)."""
    if configured.strip():
        return Welcome(_fit(configured, TEXT_LIMIT_BYTES))
    if not opening_statement.strip():
        return None
    items = menu_items(suggested_questions)
    if items:
        return Welcome(_fit(opening_statement, MENU_HEAD_MAX_BYTES), items)
    return Welcome(_fit(opening_statement, TEXT_LIMIT_BYTES))
