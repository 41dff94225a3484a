"""The Markdown parser the WeChat text renderer (wechat_text.py) uses: markdown-it's CommonMark with GFM
tables and strikethrough, and two rules changed so Dify's answers parse as a reader (and GitHub) expects:

- a line that opens a list item, quote or heading is that block even when a table delimiter row follows;
- emphasis and strikethrough delimiters next to CJK text are accepted (as markdown-it-cjk-friendly does).
"""

from __future__ import annotations

import re
import unicodedata

from markdown_it import MarkdownIt
from markdown_it.common.utils import isMdAsciiPunct, isPunctChar, isWhiteSpace
from markdown_it.rules_block.state_block import StateBlock
from markdown_it.rules_block.table import table as _gfm_table
from markdown_it.rules_inline.state_inline import Delimiter, StateInline

# A line opening a list item, a quote or a heading is that block, never a table header row (as on GitHub).
_BLOCK_START = re.compile(r"(?:[-+*]|\d{1,9}[.)]|>|#{1,6})(?:[ \t]|$)")


def markdown_parser() -> MarkdownIt:
    """A fresh parser with the changed rules in place of markdown-it's own."""
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    md.block.ruler.at("table", _table_not_in_another_block)
    md.inline.ruler.at("emphasis", _cjk_friendly_emphasis)
    md.inline.ruler.at("strikethrough", _cjk_friendly_strikethrough)
    return md


def is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F") and unicodedata.category(ch) != "So"


def _table_not_in_another_block(state: StateBlock, start: int, end: int, silent: bool) -> bool:
    """markdown-it's GFM table rule, except that `- a | b` over `--- | ---` is a list item holding a table."""
    if _BLOCK_START.match(state.src, state.bMarks[start] + state.tShift[start]):
        return False
    return _gfm_table(state, start, end, silent)


# CJK-friendly emphasis
# CommonMark's flanking rules assume words are separated by spaces. In `**注意：**请` the closing `**`
# follows punctuation and precedes a letter, so it cannot close, and the asterisks stay. As in
# markdown-it-cjk-friendly (https://github.com/tats-u/markdown-cjk-friendly), a CJK character beside
# the run counts like a space would.
# These two rules are markdown-it's own `emphasis`/`strikethrough` tokenizers with that one change.


def _scan_delims(state: StateInline, start: int, can_split_word: bool) -> tuple[bool, bool, int]:
    src, marker = state.src, state.src[start]
    end = start
    while end < state.posMax and src[end] == marker:
        end += 1
    last = src[start - 1] if start > 0 else " "
    after = src[end] if end < state.posMax else " "
    last_punct = isMdAsciiPunct(ord(last)) or isPunctChar(last)
    next_punct = isMdAsciiPunct(ord(after)) or isPunctChar(after)
    last_space, next_space = isWhiteSpace(ord(last)), isWhiteSpace(ord(after))
    last_cjk, next_cjk = is_cjk(last), is_cjk(after)
    left = not next_space and (not next_punct or last_space or last_punct or last_cjk or next_cjk)
    right = not last_space and (not last_punct or next_space or next_punct or next_cjk or last_cjk)
    can_open = left and (can_split_word or not right or last_punct)
    can_close = right and (can_split_word or not left or next_punct)
    return can_open, can_close, end - start


def _push_delimiter(state: StateInline, content: str, length: int, can_open: bool, can_close: bool) -> None:
    token = state.push("text", "", 0)
    token.content = content
    state.delimiters.append(
        Delimiter(
            marker=ord(content[0]),
            length=length,
            token=len(state.tokens) - 1,
            end=-1,
            open=can_open,
            close=can_close,
        )
    )


def _cjk_friendly_emphasis(state: StateInline, silent: bool) -> bool:
    marker = state.src[state.pos]
    if silent or marker not in ("_", "*"):
        return False
    can_open, can_close, length = _scan_delims(state, state.pos, marker == "*")
    for _ in range(length):
        _push_delimiter(state, marker, length, can_open, can_close)
    state.pos += length
    return True


def _cjk_friendly_strikethrough(state: StateInline, silent: bool) -> bool:
    if silent or state.src[state.pos] != "~":
        return False
    can_open, can_close, length = _scan_delims(state, state.pos, True)
    if length < 2:
        return False
    if length % 2:
        state.push("text", "", 0).content = "~"
    for _ in range(length // 2):
        _push_delimiter(state, "~~", 0, can_open, can_close)  # length 0 disables the "rule of 3"
    state.pos += length
    return True
