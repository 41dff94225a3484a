"""Properties of splitting answers, checked against brute force on small byte limits.

References: the fewest parts any split could have (cutting anywhere at all), and the best split over the
cuts `cuts()` lists (every pair of cut points tried, costs compared as tuples), written without the
sliding-window shortcuts of domain/replies.py. KF_FUZZ_EXAMPLES sets the number of examples per test.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.replies import Boundary, Cut, cuts, split_reply, take_full_part, utf8_len
from tests.unit.domain.test_replies import assert_reassembles, examples

LIMITS = [4, 5, 7, 10, 16, 33]
TRUNCATING_LIMITS = [5, 7, 10, 16, 33]
INF = 10**9


_TOKENS = [
    "a", "b", "Z", "7", "word", ".", ",", "!", "?", ";", ":", "/", "-",
    "字", "好", "句子", "。", "，", "、", "！", "？", "；", "：", "”", "）", "…",
    "😀", "👍🏽", "🇨🇳", "é", "e\u0301", "\u0301", "\u200d", "\ufe0f",
    " ", " ", " ", "  ", "\n", "\n", "\n\n", "\r\n", "\t", "\u3000",
]  # fmt: skip
texts = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join),
    st.text(max_size=24),
)
long_texts = st.one_of(
    st.lists(st.sampled_from(_TOKENS), min_size=20, max_size=60).map("".join),
    st.text(min_size=16, max_size=40),
)


# --- references ---------------------------------------------------------------------------------------------


def fewest_parts_anywhere(text: str, max_bytes: int) -> list[int]:
    """fewest[j]: the fewest parts of at most `max_bytes` that cover text[:j], cutting anywhere (whitespace
    alone needs no part)."""
    fewest = [0] + [INF] * len(text)
    for j in range(1, len(text) + 1):
        for i in range(j):
            piece = text[i:j].strip()
            if not piece:
                fewest[j] = min(fewest[j], fewest[i])
            elif utf8_len(piece) <= max_bytes:
                fewest[j] = min(fewest[j], fewest[i] + 1)
    return fewest


Cost = tuple[int, ...]  # (parts, cuts INSIDE_CLUSTER, ..., cuts PARAGRAPH): smaller is better


def cost_of(parts: int, levels: Sequence[Boundary]) -> Cost:
    return (parts, *(sum(1 for level in levels if level == b) for b in reversed(Boundary)))


def best_cost(text: str, max_bytes: int, *, end: int | None = None, last_room: int | None = None) -> Cost:
    """The best cost of any split of text[:end] (a cut's end, or the whole text) at the cuts `cuts()` lists,
    the last part holding at most `last_room` bytes."""
    points = [Cut(0, 0, Boundary.PARAGRAPH)] + [c for c in cuts(text) if end is None or c.end < end]
    points.append(Cut(len(text) if end is None else end, 0, Boundary.PARAGRAPH))
    room = max_bytes if last_room is None else last_room
    worst = (INF,) * (len(Boundary) + 1)
    best: list[Cost] = [worst] * len(points)
    best[0] = (0,) * (len(Boundary) + 1)
    for b in range(1, len(points)):
        limit = room if b == len(points) - 1 else max_bytes
        extra = cost_of(1, [] if b == len(points) - 1 else [points[b].boundary])
        for a in range(b):
            if best[a] != worst and utf8_len(text[points[a].resume : points[b].end]) <= limit:
                best[b] = min(best[b], tuple(x + y for x, y in zip(best[a], extra, strict=True)))
    return best[-1]


def cost_of_split(parts: list[str], text: str, *, whole: bool = True) -> tuple[Cost, list[int]]:
    ends = assert_reassembles(parts, text, whole=whole)
    levels = {c.end: c.boundary for c in cuts(text.strip())}
    return cost_of(len(parts), [levels[e] for e in ends[:-1]]), ends


def best_within(candidates: list[Cut], text: str, furthest: int, slack: int) -> tuple[Boundary, int]:
    """The best boundary among cuts ending in the last `slack` bytes up to `furthest`, and where that window
    starts (in bytes)."""
    floor = utf8_len(text[:furthest]) - slack
    window = [c.boundary for c in candidates if c.end <= furthest and utf8_len(text[: c.end]) >= floor]
    return min(window), floor


# --- split_reply --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", LIMITS)
@given(text=texts, spare=st.integers(min_value=0, max_value=2))
@examples(60)
def test_text_within_the_quota_goes_out_whole_in_the_fewest_parts_at_the_best_cuts(
    max_bytes: int, text: str, spare: int
) -> None:
    stripped = text.strip()
    fewest = fewest_parts_anywhere(stripped, max_bytes)[-1]
    parts = split_reply(text, max_bytes=max_bytes, max_parts=fewest + spare, truncation_notice="~TRUNCATED~")
    if not stripped:
        assert parts == []
        return
    assert all(utf8_len(p) <= max_bytes for p in parts)
    cost, _ = cost_of_split(parts, text)  # whole: nothing truncated, only whitespace lost at cuts
    assert len(parts) == fewest
    assert cost == best_cost(stripped, max_bytes)


@pytest.mark.parametrize("max_bytes", TRUNCATING_LIMITS)
@given(text=long_texts, short_by=st.integers(min_value=1, max_value=3))
@examples(40)
def test_text_over_the_quota_is_cut_at_the_best_boundary_near_the_end_and_says_so(
    max_bytes: int, text: str, short_by: int
) -> None:
    stripped = text.strip()
    fewest = fewest_parts_anywhere(stripped, max_bytes)
    max_parts = max(fewest[-1] - short_by, 1)
    if fewest[-1] <= max_parts:
        return  # fits in one part: nothing to truncate
    notice = "\n…" if max_bytes >= 8 else "~"
    room = max_bytes - utf8_len(notice)
    parts = split_reply(text, max_bytes=max_bytes, max_parts=max_parts, truncation_notice=notice)

    assert 1 <= len(parts) <= max_parts
    assert all(utf8_len(p) <= max_bytes for p in parts)
    assert parts[-1].endswith(notice)
    shown = [*parts[:-1], parts[-1][: -len(notice)]]
    cost, ends = cost_of_split(shown, text, whole=False)
    end = ends[-1]
    every = cuts(stripped)
    assert end in {c.end for c in every}  # the shown text stops at a cut

    # The furthest any split could show (any cut, then the notice), by brute force.
    def shows(q: int) -> bool:
        return any(
            fewest[i] <= max_parts - 1 and 0 < utf8_len(stripped[i:q].strip()) <= room for i in range(q)
        )

    furthest = max(c.end for c in every if shows(c.end))
    best, floor = best_within(every, stripped, furthest, max_bytes // 4)
    assert floor <= utf8_len(stripped[:end]) and end <= furthest
    assert {c.end: c.boundary for c in every}[end] == best
    assert cost == best_cost(stripped, max_bytes, end=end, last_room=room)


# --- take_full_part -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", LIMITS)
@given(text=texts)
@examples(60)
def test_a_full_part_is_taken_only_when_there_is_one_and_ends_at_the_best_boundary(
    max_bytes: int, text: str
) -> None:
    taken = take_full_part(text, max_bytes)
    if utf8_len(text.strip()) <= max_bytes:
        assert taken is None
        return
    assert taken is not None
    part, rest = taken
    body = text.lstrip()
    assert part + rest == body
    assert part == part.strip() and rest.strip()
    assert utf8_len(part) <= max_bytes
    known = [c for c in cuts(body) if c.end < len(body)]  # something follows: the cut is sure
    furthest = max(c.end for c in known if utf8_len(body[: c.end]) <= max_bytes)
    best, floor = best_within(known, body, furthest, max_bytes // 4)
    assert floor <= utf8_len(part) and len(part) <= furthest
    assert {c.end: c.boundary for c in known}[len(part)] == best


@pytest.mark.parametrize("max_bytes", LIMITS)
@given(chunks=st.lists(texts, max_size=6))
@examples(40)
def test_parts_taken_while_streaming_then_the_rest_reassemble_the_answer(
    max_bytes: int, chunks: list[str]
) -> None:
    sent: list[str] = []
    pending = ""
    for chunk in chunks:
        pending += chunk
        while (taken := take_full_part(pending, max_bytes)) is not None:
            sent.append(taken[0])
            pending = taken[1]
    last = split_reply(pending, max_bytes=max_bytes, max_parts=len(pending) + 1)
    assert all(utf8_len(p) <= max_bytes for p in [*sent, *last])
    assert_reassembles([*sent, *last], "".join(chunks))
