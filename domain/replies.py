"""Fitting an answer into WeCom text messages: 2048 bytes each, at most 5 per customer message."""

from __future__ import annotations

import re

TEXT_LIMIT_BYTES = 2048
MESSAGES_PER_CUSTOMER_MESSAGE = 5
DEFAULT_TRUNCATION_NOTICE = "\n（回答较长，已截断）"

# Natural boundaries, tried in order: paragraph, line, sentence, clause, word.
_PARAGRAPH = re.compile(r"\n\s*\n")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?<=[。！？!?；;])|(?<=[.](?=\s))")
_CLAUSE = re.compile(r"(?<=[，,、：:])")
_WORD = re.compile(r"(?<=\s)")


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _pieces(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Split after each boundary, keeping the separators with the piece before them."""
    out: list[str] = []
    start = 0
    for match in pattern.finditer(text):
        end = match.end()
        if end > start:
            out.append(text[start:end])
            start = end
    if start < len(text):
        out.append(text[start:])
    return out


def _hard_cut(text: str, max_bytes: int) -> list[str]:
    """Cut by characters: never inside a multi-byte character."""
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for ch in text:
        n = utf8_len(ch)
        if size + n > max_bytes and current:
            parts.append("".join(current))
            current, size = [], 0
        current.append(ch)
        size += n
    if current:
        parts.append("".join(current))
    return parts


_LEVELS = (_PARAGRAPH, _LINE, _SENTENCE, _CLAUSE, _WORD)


def _split(text: str, max_bytes: int, level: int) -> list[str]:
    if utf8_len(text) <= max_bytes:
        return [text]
    if level >= len(_LEVELS):
        return _hard_cut(text, max_bytes)
    pieces = _pieces(text, _LEVELS[level])
    if len(pieces) <= 1:
        return _split(text, max_bytes, level + 1)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if utf8_len(piece) > max_bytes:
            if current:
                chunks.append(current)
                current = ""
            chunks.extend(_split(piece, max_bytes, level + 1))
            continue
        if utf8_len(current) + utf8_len(piece) <= max_bytes:
            current += piece
        else:
            chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _trim_to(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def split_reply(
    text: str,
    *,
    max_bytes: int = TEXT_LIMIT_BYTES,
    max_parts: int = MESSAGES_PER_CUSTOMER_MESSAGE,
    truncation_notice: str = DEFAULT_TRUNCATION_NOTICE,
) -> list[str]:
    """Split `text` into at most `max_parts` messages of at most `max_bytes` UTF-8 bytes each.

    Boundaries are natural (paragraph, then line, sentence, clause, word, character). When the answer does not
    fit, the last message ends with `truncation_notice`. Blank parts are never produced.
    """
    if max_parts <= 0:
        return []
    text = text.strip()
    if not text:
        return []
    chunks = [c.strip() for c in _split(text, max_bytes, 0)]
    chunks = [c for c in chunks if c]
    if len(chunks) <= max_parts:
        return chunks
    kept = chunks[:max_parts]
    notice_bytes = utf8_len(truncation_notice)
    room = max(max_bytes - notice_bytes, 0)
    last = kept[-1]
    if utf8_len(last) > room:
        # Prefer cutting the last part at a boundary; fall back to characters.
        cut = _split(last, room, 0)[0].rstrip() if room else ""
        last = cut if cut else _trim_to(last, room)
    kept[-1] = (last + truncation_notice).strip() if last else truncation_notice.strip()
    return kept
