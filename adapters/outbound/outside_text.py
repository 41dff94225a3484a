"""Text from outside (WeCom's errmsg, Dify's error message and event fields) made safe for one log line or
exception message; shared by the WeCom and Dify adapters."""

from __future__ import annotations

# Outside text kept in exceptions and log lines: at most this many characters, control characters escaped.
MAX_OUTSIDE_TEXT = 300


def escape_outside_text(text: str, limit: int = MAX_OUTSIDE_TEXT) -> str:
    """Text from outside made safe for one log line or exception: control characters (CR, LF, ESC, ...) and
    line/paragraph separators become visible escapes, and the text is cut at `limit` characters."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
