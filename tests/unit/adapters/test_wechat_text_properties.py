"""WeChatTextRenderer over generated Markdown documents: every CommonMark construct and the GFM extensions
(tables, strikethrough, task lists) lose no word and leave no markup.

The documents are built from words of letters only (upper-case Latin and CJK), so any ASCII punctuation in
the output is either the renderer's own (the `1.` of an ordered list, the `: ` of a table or an image, the
parentheses around a url) or markup that leaked. "Text content" is what a browser would show of the
rendered HTML: the words of paragraphs, headings, emphasis, code, link texts, image alts, table cells, list
items, quotes and HTML blocks; link titles are tooltips, not text, and are not required. Urls are
`https://example.com/<n>` and are removed before looking for markers. Documents whose markup is over the
renderer's budget (it then skips the parser for a linear cleanup) are outside the property.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adapters.outbound.wechat_text import MARKUP_BUDGET, MAX_MARKDOWN_LINES, WeChatTextRenderer, markup_cost
from application.progressive import RENDER_GROWTH

render = WeChatTextRenderer()

_URL = re.compile(r"https://example\.com/\d+")
# Markers that must not survive rendering (the words and urls contain none of them).
_MARKER_CHARS = set("*_~`#[]|<>=\\-+\"'{}")
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]*|#\d+|#[xX][0-9A-Fa-f]+);")
_ENTITIES = {"&amp;": "&", "&copy;": "©", "&#26376;": "月", "&#x4E2D;": "中", "&lt;": "<", "&quot;": '"'}


@dataclass
class Doc:
    """Markdown source and the words its rendered text must contain."""

    source: str
    words: list[str] = field(default_factory=list)


_word = st.text(alphabet="ABCDEFGHKMNPRSTUVWXYZ中文字词句段问题答案订单退货发票", min_size=1, max_size=6)
_urls = st.integers(min_value=1, max_value=999).map(lambda n: f"https://example.com/{n}")


@st.composite
def inline(draw: st.DrawFn) -> Doc:
    """One inline construct around a word."""
    w = draw(_word)
    kind = draw(
        st.sampled_from(
            [
                "plain", "em", "em_", "strong", "strong_", "strike", "code", "link", "link_title",
                "image", "image_title", "autolink", "html", "entity", "nested",
            ]
        )
    )  # fmt: skip
    url = draw(_urls)
    if kind == "plain":
        return Doc(w, [w])
    if kind == "em":
        return Doc(f"*{w}*", [w])
    if kind == "em_":
        return Doc(f"_{w}_", [w])
    if kind == "strong":
        return Doc(f"**{w}**", [w])
    if kind == "strong_":
        return Doc(f"__{w}__", [w])
    if kind == "strike":
        return Doc(f"~~{w}~~", [w])
    if kind == "code":
        return Doc(f"`{w}`", [w])
    if kind == "link":
        return Doc(f"[{w}]({url})", [w])
    if kind == "link_title":
        quote = draw(st.sampled_from(['"{}"', "'{}'", "({})"]))
        return Doc(f"[{w}]({url} {quote.format(draw(_word))})", [w])
    if kind == "image":
        return Doc(f"![{w}]({url})", [w])
    if kind == "image_title":
        return Doc(f'![{w}]({url} "{draw(_word)}")', [w])
    if kind == "autolink":
        return Doc(f"<{url}>", [])
    if kind == "html":
        tag = draw(st.sampled_from(["span", "b", "em", "kbd", "u"]))
        return Doc(f"<{tag}>{w}</{tag}>", [w])
    if kind == "entity":
        entity = draw(st.sampled_from(sorted(_ENTITIES)))
        return Doc(f"{w}{entity}", [w])
    inner = draw(_word)
    return Doc(f"**{w} *{inner}* `{inner}`**", [w, inner])


@st.composite
def line(draw: st.DrawFn) -> Doc:
    parts = draw(st.lists(inline().filter(lambda d: "\n" not in d.source), min_size=1, max_size=5))
    return Doc(" ".join(p.source for p in parts), [w for p in parts for w in p.words])


@st.composite
def paragraph(draw: st.DrawFn) -> Doc:
    lines = draw(st.lists(line(), min_size=1, max_size=3))
    breaks = draw(st.lists(st.sampled_from(["\n", "  \n", "\\\n"]), min_size=len(lines), max_size=len(lines)))
    source = "".join(ln.source + brk for ln, brk in zip(lines, breaks, strict=True)).rstrip("\\\n ")
    return Doc(source, [w for ln in lines for w in ln.words])


def _block_of_words(words: list[str]) -> str:
    return " ".join(words)


@st.composite
def leaf(draw: st.DrawFn, nested: bool = False) -> Doc:
    kind = draw(
        st.sampled_from(
            [
                "para",
                "atx",
                "atx_closed",
                "setext",
                "fence",
                "tilde",
                "indented",
                "hr",
                "html",
                "table",
                "ref",
            ]
        )
    )
    if kind == "para":
        return draw(paragraph())
    if kind in ("atx", "atx_closed"):
        text = draw(line())
        hashes = "#" * draw(st.integers(1, 6))
        closing = f" {hashes}" if kind == "atx_closed" else ""
        return Doc(f"{hashes} {text.source}{closing}", text.words)
    if kind == "setext":
        text = draw(line())
        return Doc(f"{text.source}\n{draw(st.sampled_from(['===', '---', '=', '-----']))}", text.words)
    if kind in ("fence", "tilde", "indented"):
        words = draw(st.lists(_word, min_size=1, max_size=6))
        body = "\n".join(" ".join(words[i : i + 2]) for i in range(0, len(words), 2))
        if kind == "indented":
            return Doc("\n".join("    " + ln for ln in body.split("\n")), words)
        fence = "```" if kind == "fence" else "~~~"
        info = draw(st.sampled_from(["", "python", "json"]))
        return Doc(f"{fence}{info}\n{body}\n{fence}", words)
    if kind == "hr":
        # In a list item, `- ---` or `* ***` is a thematic break, not an item holding one (CommonMark 4.1):
        # the rest of the item would become something else. Underscores are never a list marker.
        rules = ["___", "_ _ _"] if nested else ["***", "---", "___", "* * *", "- - -"]
        return Doc(draw(st.sampled_from(rules)), [])
    if kind == "html":
        words = draw(st.lists(_word, min_size=1, max_size=4))
        tag = draw(st.sampled_from(["div", "p", "table", "section", "pre", "cdata", "comment"]))
        if tag == "cdata":
            return Doc(f"<![CDATA[{_block_of_words(words)}]]>", words)
        if tag == "comment":
            return Doc(f"<!-- {draw(_word)} -->\n\n{_block_of_words(words)}", words)
        if tag == "table":
            return Doc(f"<table><tr><td>{words[0]}</td></tr></table>\n{_block_of_words(words[1:])}", words)
        return Doc(f"<{tag}>\n{_block_of_words(words)}\n</{tag}>", words)
    if kind == "ref":
        url, w = draw(_urls), draw(_word)
        return Doc(f'[{w}][Label] and [label]\n\n[LABEL]: {url} "{draw(_word)}"', [w, "label"])
    # A GFM table: header, delimiter row (with alignments), body rows; cells are single lines.
    columns = draw(st.integers(1, 3))
    header = draw(st.lists(line(), min_size=columns, max_size=columns))
    rows = draw(st.lists(st.lists(line(), min_size=columns, max_size=columns), min_size=0, max_size=2))
    aligns = draw(st.lists(st.sampled_from(["---", ":--", "--:", ":-:"]), min_size=columns, max_size=columns))
    outer = draw(st.booleans())

    def row(cells: list[str]) -> str:
        inner = " | ".join(cells)
        return f"| {inner} |" if outer or columns == 1 else inner

    lines = [row([c.source for c in header]), row(aligns)] + [row([c.source for c in r]) for r in rows]
    words = [w for c in header for w in c.words] + [w for r in rows for c in r for w in c.words]
    return Doc("\n".join(lines), words)


def _indent(text: str, prefix: str, first: str | None = None) -> str:
    lines = text.split("\n")
    head = (first if first is not None else prefix) + lines[0]
    return "\n".join([head] + [(prefix + ln) if ln else ln for ln in lines[1:]])


@st.composite
def block(draw: st.DrawFn, depth: int = 0) -> Doc:
    kind = draw(
        st.sampled_from(["leaf", "leaf", "quote", "bullets", "ordered", "tasks"] if depth < 2 else ["leaf"])
    )
    if kind == "leaf":
        return draw(leaf(nested=depth > 0))
    if kind == "quote":
        inner = draw(blocks(depth + 1))
        return Doc("\n".join(("> " + ln).rstrip() for ln in inner.source.split("\n")), inner.words)
    items = draw(st.lists(blocks(depth + 1), min_size=1, max_size=3))
    out: list[str] = []
    words: list[str] = []
    start = draw(st.integers(0, 120))
    bullet = draw(st.sampled_from(["-", "*", "+"]))
    delimiter = draw(st.sampled_from([".", ")"]))
    for number, item in enumerate(items, start=start):
        if kind == "ordered":
            marker = f"{number}{delimiter} "
        elif kind == "tasks":
            marker = f"{bullet} {draw(st.sampled_from(['[ ]', '[x]', '[X]']))} "
        else:
            marker = f"{bullet} "
        source = item.source
        if kind == "tasks":  # a task item starts with a paragraph
            first = draw(line())
            source = first.source + "\n\n" + source
            words += first.words
        out.append(_indent(source, " " * len(marker if kind != "tasks" else f"{bullet} "), marker))
        words += item.words
    return Doc("\n".join(out), words)


@st.composite
def blocks(draw: st.DrawFn, depth: int = 0) -> Doc:
    parts = draw(st.lists(block(depth), min_size=1, max_size=2 if depth else 4))
    return Doc("\n\n".join(p.source for p in parts), [w for p in parts for w in p.words])


def _leftover_markup(text: str) -> list[str]:
    """Markup characters or entities in the rendered text, urls and the renderer's own punctuation aside."""
    text = _URL.sub("", text)
    problems = sorted({ch for ch in text if ch in _MARKER_CHARS} - {"&"})
    problems += _ENTITY.findall(text)
    return problems


@settings(max_examples=150, deadline=None, database=None)
@given(blocks())
def test_a_generated_document_loses_no_word_and_leaves_no_markup(doc: Doc) -> None:
    # Past the budget the renderer does not parse (the linear-time guard) and a rougher cleanup may leave
    # markers: the property is about what markdown-it renders.
    assume(markup_cost(doc.source) <= MARKUP_BUDGET and doc.source.count("\n") <= MAX_MARKDOWN_LINES)
    out = render(doc.source)
    missing = [w for w in doc.words if w not in out]
    assert not missing, f"lost {missing} from {doc.source!r}: {out!r}"
    # Entities decode to characters that are themselves marker characters (`&lt;` → `<`): not markup.
    decoded = out
    for entity, char in _ENTITIES.items():
        if entity in doc.source:
            decoded = decoded.replace(char, "")
    assert not _leftover_markup(decoded), (
        f"markup {_leftover_markup(decoded)} left in {out!r} from {doc.source!r}"
    )


# Markup-dense text as a model may write it: every block and inline marker, short words, few spaces.
_dense = st.text(alphabet="-*_+>#|:`~[]()!<>/\\\t \n.1234567890aB中&;x=", max_size=400)


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(blocks().map(lambda doc: doc.source), _dense))
def test_rendering_grows_a_text_at_most_render_growth_times(source: str) -> None:
    """Progressive replies skip a stream until its raw text could fill a part grown RENDER_GROWTH times
    (application/progressive.py): the renderer must keep to it."""
    out = render(source)
    assert len(out.encode()) <= RENDER_GROWTH * len(source.encode()), (source, out)


def test_render_growth_holds_for_the_known_worst_cases() -> None:
    for source in ("---\n" * 50, "***\n" * 50, "> ---\n" * 50, "- ---\n" * 50, "-\n" * 100, "- - -\n" * 50):
        assert len(render(source).encode()) <= RENDER_GROWTH * len(source.encode()), source
