"""Dify's Markdown answers → plain text for WeChat, which shows `**`, `#`, tables, fences raw (notes §1.11).

Choices made for a customer reading on a phone:

- Reasoning (`<think>`, `<thinking>`, `<details>`: how DeepSeek-style models and Dify wrap "thinking")
  is removed before parsing. An opening tag with no closing tag *at the very start* means the whole
  answer is reasoning (a stream cut off mid-thought), so nothing is left; mid-text, only the tags go.
  A closing `</think>` with no opening tag drops everything before it: DeepSeek-R1's chat template
  puts `<think>` in the prompt, so the answer carries only the closing tag.
- Tables become one line per body row, `表头：值；表头：值` (`Header: value; …` when the table has
  no CJK text): a grid cannot be drawn in a proportional font, and "name: value" pairs read like a
  sentence.
- Blockquotes are prefixed with `｜ ` (a full-width bar): it still reads as "quoted", and `>` would
  be markup.
- Lists use `•` (top level) and `◦` (nested, two spaces per level); ordered lists keep their numbers;
  task items become `☐`/`☑`. Horizontal rules become `——————`.
- Links read `text (url)`, or just the url when the text is empty or is the url; images `alt: url`. Link and
  image titles are tooltips, not text, and are left out.
- Strikethrough is GFM's `~~x~~` only: the single `~x~` GitHub also accepts would eat the tildes of ranges
  Chinese answers are full of ("3~5 个工作日，10~20 元").
- A line that opens a list item, quote or heading is that block even when a table delimiter row follows
  (`- a | b` over `--- | ---` is a list item holding a table, as on GitHub; markdown-it alone makes it a table
  whose first cell keeps the `-`).
- Emphasis delimiters next to CJK text are accepted (as markdown-it-cjk-friendly does): under plain
  CommonMark, `**注意：**请` is not bold, and the customer would see the asterisks.

Model output is hostile input too, and rendering runs on the event loop. markdown-it is quadratic for some
inputs (unclosed `<div ` tags, `[a](` runs, unmatched emphasis, deep lists: each opener scans the rest of the
text), so:
- only what can be sent is rendered: the answer is cut to MAX_RENDERED_CHARS (5 messages of 2048 bytes, plus a
  margin for markup) after reasoning is removed and before anything else;
- every pattern here is bounded (a tag is at most _MAX_TAG characters, `[^<>]` stops at the next `<`), so
  reasoning removal and tag stripping are linear;
- a text whose markup would make markdown-it slow (openers × length of each part between blank lines, summed,
  above MARKUP_BUDGET; or more than MAX_MARKDOWN_LINES lines) is not parsed: it gets a linear plain-text
  cleanup instead (tags, emphasis runs, heading and list markers, links), which
  reads a little rougher but costs at most a few milliseconds.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from markdown_it.token import Token

from adapters.outbound.markdown_rules import is_cjk, markdown_parser

# What can be sent: 5 messages of 2048 bytes hold at most 10240 characters; the rest is margin for markup.
MAX_RENDERED_CHARS = 5 * 2048 + 2048
# Openers × length above which markdown-it is not used (about 50 ms of its worst case on a slow CPU).
MARKUP_BUDGET = 1_000_000
# Lines above which markdown-it is not used either: it spends 20-45 us on each (about 45 ms at the limit).
MAX_MARKDOWN_LINES = 1000
# A tag's attributes are at most this long: `[^<>]{0,N}` keeps each match bounded and the scans linear.
_MAX_TAG = 512
_REASONING_TAG = re.compile(rf"<(/?)(thinking|think|details)\b[^<>]{{0,{_MAX_TAG}}}>", re.IGNORECASE)
# Reasoning tags never reach the customer, even ones that survive as text (`&lt;think&gt;`, unmatched tags).
_THINK_TAG = re.compile(rf"</?think(?:ing)?\b[^<>]{{0,{_MAX_TAG}}}>", re.IGNORECASE)
# Characters at which markdown-it may scan ahead (links, images, HTML, emphasis, code spans, autolinks).
_OPENERS = re.compile(r"[\[<*_`~!(&]|^[ \t]*(?:[-+*>]|\d{1,9}[.)])", re.MULTILINE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_ANY_TAG = re.compile(rf"</?[A-Za-z][^<>\n]{{0,{_MAX_TAG}}}>|<!--[^<>]{{0,{_MAX_TAG}}}-->")
_PLAIN_LINK = re.compile(r"!?\[([^\[\]\n]{0,500})\]\(([^()\s]{1,2000})\)")
_PLAIN_MARKS = [
    (re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.MULTILINE), ""),
    (re.compile(r"^[ \t]{0,3}(?:```|~~~)[^\n]{0,100}$", re.MULTILINE), ""),
    (re.compile(r"^[ \t]{0,3}>[ \t]?", re.MULTILINE), "｜ "),
    (re.compile(r"^([ \t]{0,12})[-+*][ \t]+", re.MULTILINE), r"\1• "),
    (re.compile(r"\*\*|__|~~"), ""),
]
_WHITESPACE_RUN = re.compile(r"\s+")
_BR_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TASK_MARK = {"[ ]": "☐", "[x]": "☑", "[X]": "☑"}
_LIST_TYPES = frozenset({"bullet_list", "ordered_list"})
_HR = "——————"
_QUOTE_PREFIX = "｜ "


class WeChatTextRenderer:
    """Markdown (as Dify writes it) → plain text that reads well in WeChat."""

    def __init__(self, *, strip_reasoning: bool = True) -> None:
        self._strip_reasoning = strip_reasoning
        self._md = markdown_parser()

    def __call__(self, markdown: str) -> str:
        source = _remove_reasoning(markdown) if self._strip_reasoning else markdown
        source = _cap(source)
        if markup_cost(source) > MARKUP_BUDGET or source.count("\n") > MAX_MARKDOWN_LINES:
            text = _plain(source)
        else:
            try:
                text = self._blocks(_tree(self._md.parse(source)))
            except Exception:  # a renderer bug must not cost the customer the answer
                text = source
        if self._strip_reasoning:
            text = _THINK_TAG.sub("", text)
        # Tables can grow in rendering ("a: b" for "|b|"); what is past the limit could not be sent anyway.
        return _tidy(text[: MAX_RENDERED_CHARS * 2])[:MAX_RENDERED_CHARS]

    def _blocks(self, nodes: list[_Node]) -> str:
        out: list[str] = []
        separator = ""
        for node in nodes:
            text = self._block(node)
            if not text.strip():
                continue
            out += (separator, text)
            # A minor heading sits directly on top of its section; h1/h2 get a blank line.
            minor_heading = node.type == "heading" and node.token.tag not in ("h1", "h2")
            separator = "\n" if minor_heading else "\n\n"
        return "".join(out)

    def _block(self, node: _Node) -> str:
        kind = node.type
        if kind in ("paragraph", "heading"):
            return self._inline_children(node)
        if kind in _LIST_TYPES:
            return self._list(node, level=0)
        if kind == "blockquote":
            inner = self._blocks(node.children)
            return "\n".join((_QUOTE_PREFIX + line).rstrip() for line in inner.split("\n"))
        if kind in ("fence", "code_block"):
            return node.token.content.rstrip("\n")
        if kind == "hr":
            return _HR
        if kind == "html_block":
            return _html_text(node.token.content)
        if kind == "table":
            return self._table(node)
        if kind == "inline":
            return self._inline(node)
        return self._blocks(node.children) if node.children else node.token.content

    def _list(self, node: _Node, *, level: int) -> str:
        ordered = node.type == "ordered_list"
        start = _int(node.token.attrs.get("start", 1)) if ordered else 0
        indent = "  " * level
        lines: list[str] = []
        for number, item in enumerate(node.children, start=start):
            marker = f"{number}." if ordered else ("•" if level == 0 else "◦")
            first = True
            for child in item.children:
                if child.type in _LIST_TYPES:
                    if first:
                        lines.append(indent + marker)
                        first = False
                    lines.append(self._list(child, level=level + 1))
                    continue
                text = self._block(child)
                if not text.strip():
                    continue
                if first:
                    text = _task_box(text, marker, ordered)
                    lines.append(indent + text.replace("\n", "\n" + indent + "  "))
                    first = False
                else:
                    lines.append(indent + "  " + text.replace("\n", "\n" + indent + "  "))
            if first:
                lines.append(indent + marker)
        return "\n".join(lines)

    def _table(self, node: _Node) -> str:
        header: list[str] = []
        rows: list[list[str]] = []
        for section in node.children:
            for row in section.children:
                cells = [" ".join(self._inline_children(cell).split()) for cell in row.children]
                if section.type == "thead":
                    header = cells
                else:
                    rows.append(cells)
        wide = any(is_cjk(ch) for cells in [header, *rows] for cell in cells for ch in cell)
        colon, separator = ("：", "；") if wide else (": ", "; ")
        if not rows:
            return separator.join(cell for cell in header if cell)
        lines = []
        for cells in rows:
            pairs = [
                f"{name}{colon}{value}" if name else value
                for name, value in zip(header, cells, strict=False)
                if value
            ]
            lines.append(separator.join(pairs))
        return "\n".join(line for line in lines if line)

    def _inline_children(self, node: _Node) -> str:
        return "".join(self._inline(child) for child in node.children)

    def _inline(self, node: _Node) -> str:
        kind = node.type
        if kind in ("text", "code_inline"):
            return node.token.content
        if kind in ("softbreak", "hardbreak"):
            return "\n"
        if kind == "html_inline":
            return "\n" if _BR_TAG.fullmatch(node.token.content.strip()) else ""
        if kind == "link":
            return self._link(node)
        if kind == "image":
            alt = self._inline_children(node).strip()
            src = self._display_url(str(node.token.attrs.get("src", "")))
            return f"{alt}: {src}" if alt and src else alt or src
        if node.children:
            return self._inline_children(node)
        return node.token.content

    def _link(self, node: _Node) -> str:
        text = self._inline_children(node).strip()
        if node.token.markup == "autolink":
            return text  # the url as the author wrote it
        href = str(node.token.attrs.get("href", ""))
        if not href:
            return text
        if f"mailto:{text}" == href:
            return text
        url = self._display_url(href)
        if not text or text in (href, url):
            return url
        return f"{text} ({url})"

    def _display_url(self, href: str) -> str:
        # markdown-it stores hrefs percent-encoded and punycoded; show them readable unless decoding would put
        # whitespace into the url (WeChat would end the link there).
        readable = self._md.normalizeLinkText(href)
        return href if any(ch.isspace() for ch in readable) else readable


@dataclass(slots=True)
class _Node:
    """A token with the tokens nested in it (an `_open` token stands for its whole container)."""

    token: Token
    children: list[_Node]

    @property
    def type(self) -> str:
        return self.token.type.removesuffix("_open")


def _tree(tokens: list[Token]) -> list[_Node]:
    # markdown_it.tree.SyntaxTreeNode does the same, but costs several times the parse on a long answer.
    root: list[_Node] = []
    stack = [root]
    for token in tokens:
        if token.nesting == 1:
            node = _Node(token, [])
            stack[-1].append(node)
            stack.append(node.children)
        elif token.nesting == -1:
            if len(stack) > 1:
                stack.pop()
        else:
            stack[-1].append(_Node(token, _tree(token.children) if token.children else []))
    return root


def markup_cost(text: str) -> int:
    """How much scanning markdown-it may do on `text`, at most: openers × length, summed over the parts
    between blank lines (no paragraph, inline run or HTML block that scans ahead crosses one)."""
    return sum(len(_OPENERS.findall(part)) * len(part) for part in _BLANK_LINE.split(text))


def _cap(text: str) -> str:
    """`text` cut to what can be sent, at a line end when there is one in the last quarter."""
    if len(text) <= MAX_RENDERED_CHARS:
        return text
    cut = text.rfind("\n", MAX_RENDERED_CHARS * 3 // 4, MAX_RENDERED_CHARS)
    return text[: cut if cut > 0 else MAX_RENDERED_CHARS]


def _plain(text: str) -> str:
    """Linear cleanup for text too marked-up to parse: tags out, links as `text (url)`, markers simplified."""
    text = _ANY_TAG.sub("", text)
    text = _PLAIN_LINK.sub(lambda m: f"{m[1]} ({m[2]})" if m[1] else m[2], text)
    for pattern, replacement in _PLAIN_MARKS:
        text = pattern.sub(replacement, text)
    return html.unescape(text)


def _remove_reasoning(text: str) -> str:
    out: list[str] = []
    pos = 0
    open_name = ""  # the reasoning block we are inside, if any
    open_at = depth = 0
    seen_block = False
    for tag in _REASONING_TAG.finditer(text):
        closing, name = tag.group(1) == "/", tag.group(2).lower()
        if not open_name:
            if not closing:
                out.append(text[pos : tag.start()])
                open_name, open_at, depth, seen_block = name, tag.start(), 1, True
            elif name != "details" and not seen_block:
                # DeepSeek-R1: the opening <think> was part of the prompt; everything so far is reasoning.
                seen_block = True
                pos = tag.end()
            continue
        if name != open_name:
            continue
        if name == "details":  # <details> nests; <think> does not
            depth += -1 if closing else 1
        elif closing:
            depth = 0
        if depth == 0:
            open_name = ""
            pos = tag.end()
    if open_name:
        # Unterminated: at the very start the rest is all reasoning; mid-text only its tags go (later).
        if any(part.strip() for part in out):
            out.append(text[open_at:])
    else:
        out.append(text[pos:])
    return "".join(out)


class _HtmlText(HTMLParser):
    """The text of an HTML block: tags dropped, block-level tags turned into line breaks."""

    _BREAKING = frozenset({"br", "p", "div", "li", "tr", "ul", "ol", "table", "summary", "details", "hr"})
    _BREAKING |= {f"h{level}" for level in range(1, 7)}
    _SILENT = frozenset({"script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._silent = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SILENT:
            self._silent += 1
        elif tag in self._BREAKING:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SILENT:
            self._silent = max(0, self._silent - 1)
        elif tag in self._BREAKING:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._silent:
            self.parts.append(_WHITESPACE_RUN.sub(" ", data))

    def unknown_decl(self, data: str) -> None:
        # `<![CDATA[...]]>` is text a browser shows as is.
        if data.startswith("CDATA["):
            self.handle_data(data.removeprefix("CDATA["))


def _html_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "\n".join(line.strip() for line in "".join(parser.parts).split("\n"))


def _task_box(text: str, marker: str, ordered: bool) -> str:
    box = _TASK_MARK.get(text[:3]) if text[3:4] in (" ", "\n", "") else None
    if box is None:
        return f"{marker} {text}"
    rest = text[3:].lstrip(" ")
    return f"{marker} {box} {rest}" if ordered else f"{box} {rest}"


def _tidy(text: str) -> str:
    lines: list[str] = []
    for line in text.split("\n"):
        line = line.rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 1
