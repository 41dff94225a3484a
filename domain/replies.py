"""Fitting an answer into WeCom text messages: 2048 bytes each, at most 5 per customer message.

An answer is cut only where it must be, and where it reads best: between paragraphs, then lines, sentences,
clauses, words, characters; inside a word or a character cluster (an emoji sequence, a letter and its accents)
only when nothing else fits. `split_reply` finds the fewest parts possible and, among splits with that many
parts, the one with the best cuts; an answer cut short because the quota ends says so in its last part.
`take_full_part` serves progressive sending: it takes one full part off the front of a text still streaming.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

from domain.reply_cuts import Boundary, Cut, Layout, clean, cuts, utf8_len

__all__ = [
    "DEFAULT_TRUNCATION_NOTICE",
    "MESSAGES_PER_CUSTOMER_MESSAGE",
    "TEXT_LIMIT_BYTES",
    "Boundary",
    "Cut",
    "cuts",
    "split_reply",
    "take_full_part",
    "utf8_len",
]

TEXT_LIMIT_BYTES = 2048
MESSAGES_PER_CUSTOMER_MESSAGE = 5
DEFAULT_TRUNCATION_NOTICE = "\n（回答较长，已截断）"

# The widest UTF-8 character: a part must be able to hold any one character.
_MIN_PART_BYTES = 4
# Where a part is cut without the whole answer in view (a truncated answer, a streaming one), the best
# boundary in the last quarter of what fits wins over a worse one further on.
_WINDOW_FRACTION = 4


def split_reply(
    text: str,
    *,
    max_bytes: int = TEXT_LIMIT_BYTES,
    max_parts: int = MESSAGES_PER_CUSTOMER_MESSAGE,
    truncation_notice: str = DEFAULT_TRUNCATION_NOTICE,
) -> list[str]:
    """Split `text` into at most `max_parts` messages of at most `max_bytes` UTF-8 bytes each.

    When the text fits, it is never truncated: the split has the fewest parts possible and, among those, the
    best cuts (fewest cuts of the worst kind, then of the next...; ties go to fuller earlier parts). Only
    whitespace at a cut is lost. When it does not fit, the last message ends at a boundary followed by
    `truncation_notice`, which fits in that message. Blank parts are never produced. `max_bytes` must be at
    least 4 (one UTF-8 character).
    """
    if max_bytes < _MIN_PART_BYTES:
        raise ValueError(f"max_bytes must be at least {_MIN_PART_BYTES}, got {max_bytes}")
    if max_parts <= 0:
        return []
    text = clean(text).strip()
    if not text:
        return []
    if len(text) <= max_bytes // _MIN_PART_BYTES or utf8_len(text) <= max_bytes:
        return [text]
    layout = Layout.of(text, max_nonspace=max_parts * max_bytes + _MIN_PART_BYTES)
    if layout.complete and _fewest_parts(layout, max_bytes, max_parts) <= max_parts:
        chosen = _best_split(layout, layout.last, max_bytes, last_room=max_bytes)
        if chosen is not None:
            return layout.parts(chosen)
    return _truncated(layout, max_bytes, max_parts, clean(truncation_notice).rstrip())


def take_full_part(text: str, max_bytes: int = TEXT_LIMIT_BYTES) -> tuple[str, str] | None:
    """For progressive sending: once the text streamed so far holds more than one part, the first part and
    the rest; None while it may still all fit in one.

    The part (leading and trailing whitespace removed) ends at the best boundary in the last quarter of what
    fits in `max_bytes`, and never at the very end of `text`, where the next chunk may continue the word. The
    rest keeps the whitespace that follows the cut (`split_reply` and the next call drop it). Parts taken one
    by one this way may be more than `split_reply` needs for the whole text: send them only while the quota
    is not at risk, and fit the end with `split_reply`.
    """
    if max_bytes < _MIN_PART_BYTES:
        raise ValueError(f"max_bytes must be at least {_MIN_PART_BYTES}, got {max_bytes}")
    text = clean(text).lstrip()
    if utf8_len(text.rstrip()) <= max_bytes:
        return None
    layout = Layout.of(text, max_nonspace=max_bytes + _MIN_PART_BYTES)
    # The last cut known to be one: something follows it in the text so far.
    usable = layout.last if layout.ends[layout.last] < len(text) else layout.last - 1
    furthest = _reach(layout, 0, max_bytes, usable)
    if furthest == 0:  # unreachable with max_bytes >= 4 and a text longer than max_bytes
        return None
    chosen = _best_near(layout, furthest, max_bytes // _WINDOW_FRACTION)
    end = layout.ends[chosen]
    return text[:end], text[end:]


# --- choosing the cuts --------------------------------------------------------------------------------------


def _reach(layout: Layout, start: int, room: int, limit: int) -> int:
    """The furthest node up to `limit` where a part beginning after node `start` can end; else `start`."""
    end_bytes = layout.end_bytes
    return max(start, bisect_right(end_bytes, layout.resume_bytes[start] + room, start + 1, limit + 1) - 1)


def _fewest_parts(layout: Layout, max_bytes: int, enough: int) -> int:
    """How many parts the whole text needs at least (greedy: each part as long as possible is optimal, since
    a part that fits still fits when it starts later); counts only up to `enough` + 1."""
    node, count = 0, 0
    while node < layout.last and count <= enough:
        node = _reach(layout, node, max_bytes, layout.last)
        count += 1
    return count


def _best_split(layout: Layout, last: int, max_bytes: int, *, last_room: int) -> list[int] | None:
    """The cut nodes (ending with `last`) of the best split of text up to node `last`, the part that ends
    there holding at most `last_room` bytes and the others `max_bytes`.

    Best: fewest parts, then fewest INSIDE_CLUSTER cuts, then INSIDE_WORD, ... then LINE (a lexicographic
    order, encoded as one integer with a digit per level, base > any count); ties go to longer earlier parts.
    Dynamic programming from the end: best[a] = min over the nodes b a part starting after a can reach of
    part + weight(b) + best[b]. Those b form a window that slides left as a does, so a monotonic deque gives
    each minimum in amortised constant time: linear overall.
    """
    if last == 0:
        return []
    end_bytes, resume_bytes, levels = layout.end_bytes, layout.resume_bytes, layout.levels
    base = last + 2
    weights = [base**level for level in range(len(Boundary))]
    one_part = base ** len(Boundary)
    best: list[int | None] = [None] * (last + 1)
    follow = [0] * (last + 1)
    best[last] = 0
    window: deque[tuple[int, int]] = deque()  # (cost, node): nodes ascending, costs non-increasing
    for start in range(last - 1, -1, -1):
        node = start + 1
        after = best[node]
        if node < last and after is not None:
            cost = one_part + weights[levels[node]] + after
            while window and window[0][0] > cost:
                window.popleft()
            window.appendleft((cost, node))
        while window and end_bytes[window[-1][1]] - resume_bytes[start] > max_bytes:
            window.pop()
        if end_bytes[last] - resume_bytes[start] <= last_room:
            best[start], follow[start] = one_part, last
        elif window:
            best[start], follow[start] = window[-1]
    if best[0] is None:
        return None
    out, node = [], 0
    while node != last:
        node = follow[node]
        out.append(node)
    return out


def _best_near(layout: Layout, furthest: int, slack: int) -> int:
    """The node with the best boundary among those ending at most `slack` bytes before node `furthest`
    (never node 0); the furthest such node on a tie."""
    floor = layout.end_bytes[furthest] - slack
    levels, end_bytes = layout.levels, layout.end_bytes
    chosen, node = furthest, furthest - 1
    while node > 0 and end_bytes[node] >= floor:
        if levels[node] < levels[chosen]:
            chosen = node
        node -= 1
    return chosen


def _truncated(layout: Layout, max_bytes: int, max_parts: int, notice: str) -> list[str]:
    """What fits of a text too long for `max_parts` parts, ending at a good boundary and then `notice`."""
    notice_bytes = utf8_len(notice)
    room = max_bytes - notice_bytes
    if room < _MIN_PART_BYTES:
        # No room for the notice after any text: it goes alone in the last part.
        alone = _fit_notice(notice, max_bytes)
        if max_parts == 1:
            return [alone] if alone else []
        return [*_truncated(layout, max_bytes, max_parts - 1, ""), *([alone] if alone else [])]
    # The furthest the text can go: full parts, then the last with the notice (greedy is optimal again).
    node = 0
    for _ in range(max_parts - 1):
        node = _reach(layout, node, max_bytes, layout.last)
    furthest = _reach(layout, node, room, layout.last)
    if layout.complete and furthest == layout.last:
        furthest -= 1  # cannot happen: the text would have fit without the notice
    end = _best_near(layout, furthest, max_bytes // _WINDOW_FRACTION)
    chosen = _best_split(layout, end, max_bytes, last_room=room)
    if chosen is None or len(chosen) > max_parts:  # not expected: any earlier end fits too
        chosen = _greedy(layout, furthest, max_bytes, max_parts)
    parts = layout.parts(chosen)
    parts[-1] = (parts[-1] + notice).rstrip()
    return parts


def _greedy(layout: Layout, last: int, max_bytes: int, max_parts: int) -> list[int]:
    out, node = [], 0
    for _ in range(max_parts - 1):
        node = _reach(layout, node, max_bytes, last)
        if node == last:
            break
        out.append(node)
    out.append(last)
    return out


def _fit_notice(notice: str, max_bytes: int) -> str:
    return notice.strip().encode("utf-8")[:max_bytes].decode("utf-8", "ignore").rstrip()
