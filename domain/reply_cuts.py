"""Where an answer may be cut into WeCom text messages, and how good each place is (domain/replies.py chooses
among them): between paragraphs, then lines, sentences, clauses, words, characters; inside a word or a
character cluster (an emoji sequence, a letter and its accents) only when nothing else fits."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import IntEnum


class Boundary(IntEnum):
    """Where a cut falls, best first."""

    PARAGRAPH = 0
    LINE = 1
    SENTENCE = 2
    CLAUSE = 3
    WORD = 4
    CHARACTER = 5
    INSIDE_WORD = 6  # inside a run of letters, digits and URL punctuation: "hel|lo", "3|.14", "a.com|/x"
    INSIDE_CLUSTER = 7  # between a character and its combining mark, variation selector, ZWJ partner...


@dataclass(frozen=True, slots=True)
class Cut:
    """A place the text may be cut: the part before ends at `end`, the next begins at `resume` (the whitespace
    between them is dropped), and how good a place it is."""

    end: int
    resume: int
    boundary: Boundary


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def cuts(text: str) -> list[Cut]:
    """Every place `text` may be cut (one per run of whitespace, one between any two other characters), with
    how good a place it is; positions are indices in `text`. The start and end of the text are not cuts."""
    layout = Layout.of(text, max_nonspace=utf8_len(text))
    return [
        Cut(layout.ends[i], layout.resumes[i], Boundary(layout.levels[i]))
        for i in range(1, layout.last + 1)
        if layout.ends[i] < len(text)
    ]


_RUNS = re.compile(r"\s+|\S+")
_SENTENCE_WIDE = frozenset("。！？；…｡．")
_SENTENCE_ASCII = frozenset(".!?;")
_CLAUSE_WIDE = frozenset("，、：､")
_CLAUSE_ASCII = frozenset(",:")
_CLOSERS = frozenset("\"'”’」』）)]】》〉〕")
_STICKY = _SENTENCE_WIDE | _SENTENCE_ASCII | _CLAUSE_WIDE | _CLAUSE_ASCII | _CLOSERS
# Punctuation that keeps a run of letters and digits together (numbers, URLs, e-mail addresses, code).
_CONNECTORS = frozenset("._-'/@%+#&=~:?!,;*\\")
_ZWJ = "\u200d"


def clean(text: str) -> str:
    """Lone surrogates (possible in decoded JSON) cannot be sent: U+FFFD instead; split pairs are joined."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _width(ch: str) -> int:
    code = ord(ch)
    return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4


def _is_wide(ch: str) -> bool:
    code = ord(ch)
    if code < 0x1100:
        return False
    return 0x4E00 <= code <= 0x9FFF or unicodedata.east_asian_width(ch) in ("W", "F")


def _wordish(ch: str) -> bool:
    return ch in _CONNECTORS or (ch.isalnum() and not _is_wide(ch))


def _continues_cluster(prev: str, nxt: str) -> bool:
    """Whether `nxt` belongs to the same user-perceived character as `prev` (a close approximation)."""
    code = ord(nxt)
    if prev != _ZWJ and (code < 0x300 or 0x3100 <= code < 0xA000):  # no marks there (Latin-1, CJK)
        return False
    return (
        prev == _ZWJ
        or nxt == _ZWJ
        or unicodedata.category(nxt) in ("Mn", "Me", "Mc")
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0xE0100 <= code <= 0xE01EF
        or 0x1F3FB <= code <= 0x1F3FF  # skin tones
        or 0xE0020 <= code <= 0xE007F  # emoji tag sequences
        or (0x1F1E6 <= code <= 0x1F1FF and 0x1F1E6 <= ord(prev) <= 0x1F1FF)  # flags
    )


def _punctuation(text: str, end: int, spaced: bool) -> Boundary | None:
    """SENTENCE or CLAUSE when text[:end] ends with such punctuation (maybe followed by closing quotes or
    brackets). ASCII punctuation counts only before whitespace or a wide (CJK) character: "3.14", "a,b"."""
    nxt = None if spaced or end >= len(text) else text[end]
    if nxt is not None and nxt in _STICKY:
        return None  # "？！", "。」": cut after the last of them
    i = end - 1
    while i > 0 and i > end - 4 and text[i] in _CLOSERS:
        i -= 1
    ch = text[i]
    loose = nxt is None or _is_wide(nxt)
    if ch in _SENTENCE_WIDE or (loose and ch in _SENTENCE_ASCII):
        return Boundary.SENTENCE
    if ch in _CLAUSE_WIDE or (loose and ch in _CLAUSE_ASCII):
        return Boundary.CLAUSE
    return None


def _between(text: str, end: int) -> Boundary:
    """A cut between two characters with no whitespace between them."""
    if end >= len(text):
        return Boundary.CHARACTER  # the end of the text: never used as a cut
    prev, nxt = text[end - 1], text[end]
    if _continues_cluster(prev, nxt):
        return Boundary.INSIDE_CLUSTER
    punctuation = _punctuation(text, end, spaced=False)
    if punctuation is not None:
        return punctuation
    if _wordish(prev) and _wordish(nxt):
        return Boundary.INSIDE_WORD
    return Boundary.CHARACTER


def _at_space(text: str, end: int, space: str) -> Boundary:
    """A cut at a run of whitespace that starts at `end`."""
    breaks = max(space.count("\n"), space.count("\r")) + space.count("\u2028") + 2 * space.count("\u2029")
    if breaks >= 2:
        return Boundary.PARAGRAPH
    if breaks == 1:
        return Boundary.LINE
    return _punctuation(text, end, spaced=True) or Boundary.WORD


class Layout:
    """The cuts of a text, as parallel lists indexed by node: node 0 is the start, node `last` the end of
    the text or, when `complete` is false, a cut after about `max_nonspace` bytes of characters other than
    whitespace (at least `max_nonspace` - 3: callers ask for more than any split they consider can reach).
    ends/resumes are character indices, end_bytes/resume_bytes the matching UTF-8 offsets."""

    __slots__ = ("text", "ends", "resumes", "end_bytes", "resume_bytes", "levels", "complete")

    def __init__(self, text: str) -> None:
        self.text = text
        self.ends = [0]
        self.resumes = [0]
        self.end_bytes = [0]
        self.resume_bytes = [0]
        self.levels: list[int] = [Boundary.PARAGRAPH]
        self.complete = True

    @property
    def last(self) -> int:
        return len(self.ends) - 1

    @classmethod
    def of(cls, text: str, *, max_nonspace: int) -> Layout:
        """`text` must not start with whitespace."""
        layout = cls(text)
        ends, resumes, end_bytes, resume_bytes, levels = (
            layout.ends,
            layout.resumes,
            layout.end_bytes,
            layout.resume_bytes,
            layout.levels,
        )
        size = 0
        budget = max_nonspace
        for run in _RUNS.finditer(text):
            chunk = run.group()
            if chunk[0].isspace():
                size += utf8_len(chunk)
                resumes[-1] = run.end()
                resume_bytes[-1] = size
                levels[-1] = _at_space(text, run.start(), chunk)
                continue
            if budget <= 0:
                layout.complete = False
                break
            encoded = chunk.encode("utf-8", "surrogatepass")
            if len(encoded) > budget:
                chunk = encoded[:budget].decode("utf-8", "ignore") or chunk[0]
                layout.complete = False
            budget -= len(encoded)
            first = run.start() + 1
            positions = range(first, first + len(chunk))
            ends.extend(positions)
            resumes.extend(positions)
            for ch in chunk:
                size += _width(ch)
                end_bytes.append(size)
            resume_bytes.extend(end_bytes[-len(chunk) :])
            levels.extend([_between(text, position) for position in positions])
            if not layout.complete:
                break
        return layout

    def part(self, start: int, stop: int) -> str:
        return self.text[self.resumes[start] : self.ends[stop]]

    def parts(self, cut_nodes: list[int]) -> list[str]:
        out, start = [], 0
        for node in cut_nodes:
            out.append(self.part(start, node))
            start = node
        return out
