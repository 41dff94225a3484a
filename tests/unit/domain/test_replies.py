from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.replies import split_reply, utf8_len


def test_short_answer_is_one_message() -> None:
    assert split_reply("你好，有什么可以帮您？") == ["你好，有什么可以帮您？"]


def test_blank_answer_gives_no_message() -> None:
    assert split_reply("") == []
    assert split_reply("   \n\n  ") == []


def test_long_answer_splits_on_paragraphs_first() -> None:
    para = "这是一段话。" * 100  # 1800 bytes
    text = f"{para}\n\n{para}\n\n{para}"
    parts = split_reply(text)
    assert parts == [para, para, para]


def test_paragraph_too_long_splits_on_sentences() -> None:
    sentence = "这是一个句子，用来测试拆分。"  # 14 chars * 3 bytes = 42 bytes
    text = sentence * 100  # 4200 bytes, one paragraph
    parts = split_reply(text)
    assert all(utf8_len(p) <= 2048 for p in parts)
    assert all(p.endswith("。") for p in parts)
    assert "".join(parts) == text


def test_text_without_boundaries_is_cut_between_characters() -> None:
    text = "字" * 2000  # 6000 bytes
    parts = split_reply(text)
    assert all(utf8_len(p) <= 2048 for p in parts)
    assert "".join(parts) == text
    for p in parts:
        p.encode("utf-8").decode("utf-8")


def test_mixed_width_characters_never_split_inside_a_character() -> None:
    text = "a字😀" * 1500
    parts = split_reply(text, max_parts=10)
    assert "".join(parts) == text
    assert all(utf8_len(p) <= 2048 for p in parts)


def test_answer_over_the_quota_is_truncated_with_a_notice() -> None:
    para = "很长的回答。" * 300  # 5400 bytes per paragraph
    text = "\n\n".join([para] * 5)
    parts = split_reply(text, truncation_notice="\n（已截断）")
    assert len(parts) == 5
    assert parts[-1].endswith("（已截断）")
    assert all(utf8_len(p) <= 2048 for p in parts)


def test_quota_left_limits_the_parts() -> None:
    text = "\n\n".join(["段落。" * 300] * 4)
    assert len(split_reply(text, max_parts=2)) == 2
    assert split_reply(text, max_parts=0) == []


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=9000), st.integers(min_value=1, max_value=6))
def test_any_text_fits_wecom_limits(text: str, max_parts: int) -> None:
    parts = split_reply(text, max_parts=max_parts)
    assert len(parts) <= max_parts
    for part in parts:
        assert part.strip()
        assert utf8_len(part) <= 2048
