"""Handoff triggers: the customer's keywords and the AI app's marker, which the customer never sees."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.commands import DEFAULT_HANDOFF_WORDS, CommandKind, CommandSet
from domain.handoff import DEFAULT_HANDOFF_MARKERS, NESTED_MARKERS_CAP, MarkedAnswer, take_handoff_marker


@pytest.mark.parametrize("text", ["转人工", " 人工客服 ", "人工", "#转人工", "转人工！", "ＨＵＭＡＮ"])
def test_handoff_keywords_are_commands(text: str) -> None:
    commands = CommandSet.of(handoff=(*DEFAULT_HANDOFF_WORDS, "human"))
    command = commands.parse(text)
    assert command is not None and command.kind is CommandKind.HANDOFF


@pytest.mark.parametrize("text", ["我想转人工可以吗", "人工智能是什么", "reset"])
def test_questions_mentioning_a_human_are_not_handoffs(text: str) -> None:
    command = CommandSet.of(handoff=DEFAULT_HANDOFF_WORDS).parse(text)
    assert command is None or command.kind is not CommandKind.HANDOFF


def test_an_answer_without_marker_is_untouched() -> None:
    marked = take_handoff_marker("您好，请问有什么可以帮您？\n\n- 一\n- 二")
    assert marked.handoff is False
    assert marked.text == "您好，请问有什么可以帮您？\n\n- 一\n- 二"


def test_the_default_markers() -> None:
    assert DEFAULT_HANDOFF_MARKERS == ("[[转人工]]", "[HANDOFF]")


@pytest.mark.parametrize(
    ("answer", "rest"),
    [
        ("这个问题需要人工处理。[[转人工]]", "这个问题需要人工处理。"),
        ("[[转人工]]", ""),
        ("  [[转人工]]  \n", ""),
        ("[[转人工]]稍等，正在为您转接。", "稍等，正在为您转接。"),
        ("第一段。\n\n[[转人工]]\n\n第二段。", "第一段。\n\n第二段。"),
        ("请稍候 [HANDOFF]", "请稍候"),
        ("请稍候 [handoff]", "请稍候"),
        ("全角也算［［转人工］］", "全角也算"),
        ("两次[[转人工]]也只是[HANDOFF]一次", "两次也只是一次"),
        ("[[转[[转人工]]人工]]嵌套的也去掉", "嵌套的也去掉"),
    ],
)
def test_markers_are_removed_and_recognised(answer: str, rest: str) -> None:
    marked = take_handoff_marker(answer)
    assert marked.handoff is True
    assert marked.text == rest


def test_configured_markers_replace_the_defaults() -> None:
    assert take_handoff_marker("好的<<HUMAN>>", ("<<HUMAN>>",)).text == "好的"
    assert take_handoff_marker("好的[[转人工]]", ("<<HUMAN>>",)).handoff is False


def test_no_markers_configured_means_no_handoff() -> None:
    assert take_handoff_marker("好的[[转人工]]", ()).handoff is False


@given(st.text(max_size=200), st.text(max_size=200), st.sampled_from(DEFAULT_HANDOFF_MARKERS))
def test_a_marker_never_survives(before: str, after: str, marker: str) -> None:
    marked = take_handoff_marker(before + marker + after)
    assert marked.handoff
    assert marker not in marked.text
    assert "[[转人工]]" not in marked.text and "[handoff]" not in marked.text.casefold()


_FRAGMENTS = st.text(alphabet=st.sampled_from(list("[]［］【】转人工HANDOFhandof \n")), max_size=60)


@given(_FRAGMENTS, _FRAGMENTS, st.sampled_from(DEFAULT_HANDOFF_MARKERS))
def test_no_marker_is_left_even_from_pieces_of_markers(before: str, after: str, marker: str) -> None:
    marked = take_handoff_marker(before + marker + after)
    assert marked.handoff
    assert not take_handoff_marker(marked.text).handoff


def test_deeply_nested_markers_are_unwound_in_one_pass() -> None:
    depth = 4000  # 28K characters: under the cap
    answer = "好的。" + "[[转人" * depth + "[[转人工]]" + "工]]" * depth + "稍等"

    marked = take_handoff_marker(answer)

    assert marked.handoff is True
    assert marked.text == "好的。稍等"


def test_nested_markers_in_a_huge_answer_leave_at_most_the_cap() -> None:
    depth = 40_000
    answer = "[[转人" * depth + "[[转人工]]" + "工]]" * depth

    marked = take_handoff_marker(answer)

    assert marked.handoff is True
    assert len(marked.text) <= NESTED_MARKERS_CAP
    assert "[[转人工]]" not in marked.text


def test_an_unterminated_marker_run_is_not_a_handoff() -> None:
    answer = "[[转人" * 50_000

    assert take_handoff_marker(answer) == MarkedAnswer(answer, False)
