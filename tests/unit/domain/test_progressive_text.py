"""How much of a streaming answer may be shown: paragraph boundaries outside fences, reasoning and markers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.handoff import DEFAULT_HANDOFF_MARKERS, marker_start, take_handoff_marker
from domain.progressive_text import _open_reasoning as open_reasoning
from domain.progressive_text import shown_until

P1 = "第一段，讲清楚问题的背景和原因。"
P2 = "第二段，给出处理办法和注意事项。"


def test_the_last_paragraph_boundary_is_where_showing_may_stop() -> None:
    text = f"{P1}\n\n{P2}\n\n第三段还在写"
    assert shown_until(text) == text.index("第三段")


def test_nothing_before_a_second_paragraph_has_begun() -> None:
    assert shown_until(f"{P1}\n\n") is None
    assert shown_until(P1) is None


def test_a_boundary_counts_from_the_given_start() -> None:
    text = f"{P1}\n\n{P2}\n\n第三段还在写，已经写了很多字"
    first = text.index(P2)
    assert shown_until(text, first) == text.index("第三段")
    assert shown_until(text, text.index("第三段")) is None


def test_a_paragraph_whose_first_line_is_still_short_and_open_is_not_judged_yet() -> None:
    # "1" may become "1. item", a list that continues the one before.
    assert shown_until(f"{P1}\n\n1") is None
    assert shown_until(f"{P1}\n\n- 列表项\n") is None


@pytest.mark.parametrize("follow", ["- 二\n", "2. 二\n", "    缩进的代码\n", "\t续行\n"])
def test_a_blank_line_before_a_list_item_or_indented_line_is_no_boundary(follow: str) -> None:
    assert shown_until(f"- 一\n\n{follow}") is None


def test_no_boundary_inside_an_open_code_fence() -> None:
    text = f"{P1}\n\n```python\nprint(1)\n\nprint(2)\n\nprint(3)\n"
    assert shown_until(text) == text.index("```")


def test_a_closed_fence_ends_the_hold() -> None:
    text = f"```\na\n\nb\n```\n\n{P2}\n"
    assert shown_until(text) == text.index(P2)


@pytest.mark.parametrize("opening", ["<think>", "<thinking>", '<details style="color:gray">', "<THINK>"])
def test_an_open_reasoning_block_and_everything_after_it_wait(opening: str) -> None:
    text = f"{P1}\n\n{P2}\n\n{opening}\n想一想\n\n再想一想\n\n更多推理内容写在这里\n"
    assert shown_until(text) == text.index(P2)


@pytest.mark.parametrize("partial", ["<", "<th", "<thin", "<details", '<details open="'])
def test_a_tag_still_being_written_waits(partial: str) -> None:
    text = f"{P1}\n\n{P2}\n\n{partial}"
    assert shown_until(text) == text.index(P2)


def test_paragraphs_inside_a_closed_reasoning_block_are_no_boundaries() -> None:
    text = f"<think>\n推理一\n\n推理二\n\n推理三写得很长很长\n</think>\n\n{P1}\n\n{P2}\n"
    assert shown_until(text) == text.index(P2)


def test_nested_details_close_with_their_last_closing_tag() -> None:
    text = "<details>\n<details>\n内层\n</details>\n\n仍在外层的推理内容\n\n还在外层\n"
    assert shown_until(text) is None


@pytest.mark.parametrize("marker", ["[[转人工]]", "［［转人工］］", "【【转人工】】", "[handoff]"])
def test_the_line_of_a_handoff_marker_waits(marker: str) -> None:
    text = f"{P1}\n\n{P2}\n\n好的，{marker}\n\n后面还有一段话写在这里\n"
    assert shown_until(text) == text.index(P2)


@pytest.mark.parametrize("partial", ["[", "[[", "[[转", "[[转人", "[[转人工]", "[HAND", "【【"])
def test_a_marker_still_being_written_waits(partial: str) -> None:
    text = f"{P1}\n\n{P2}\n\n好的，{partial}"
    assert shown_until(text) == text.index(P2)


def test_marker_start_finds_whole_and_begun_markers() -> None:
    assert marker_start("你好[[转人工]]再见") == 2
    assert marker_start("你好[[转") == 2
    assert marker_start("你好[[转人工]]xx[[") == 2
    assert marker_start("你好，没有标记") is None
    assert marker_start("a[", ("[[转人工]]",)) == 1
    assert marker_start("a[b", ("[[转人工]]",)) is None
    assert marker_start("abc", ()) is None


@given(st.text(alphabet="ab \n`<>[]转人工think/", max_size=300), st.integers(min_value=0, max_value=300))
def test_what_may_be_shown_never_holds_a_marker_or_reasoning_that_is_still_open(text: str, cut: int) -> None:
    # However the stream is cut, the part shown carries no marker, no half marker and no open reasoning.
    streamed = text[:cut]
    end = shown_until(streamed)
    if end is None:
        return
    shown = streamed[:end]
    assert not take_handoff_marker(shown, DEFAULT_HANDOFF_MARKERS).handoff
    assert marker_start(shown) is None
    assert open_reasoning(shown, 0) is None
