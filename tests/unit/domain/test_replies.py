from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.replies import split_reply, take_full_part, utf8_len


def examples(default: int) -> settings:
    """Deterministic property tests; KF_FUZZ_EXAMPLES (e.g. 5000 for a long local run) wins over `default`."""
    env = os.environ.get("KF_FUZZ_EXAMPLES", "").strip()
    return settings(
        max_examples=int(env) if env else default,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


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


@given(st.text(min_size=0, max_size=9000), st.integers(min_value=1, max_value=6))
@examples(60)
def test_any_text_fits_wecom_limits(text: str, max_parts: int) -> None:
    parts = split_reply(text, max_parts=max_parts)
    assert len(parts) <= max_parts
    for part in parts:
        assert part.strip()
        assert utf8_len(part) <= 2048


# --- filling parts (issue #16): the fewest parts, cut where it reads best -----------------------------------


def _paragraph(size: int, seed: int) -> str:
    """Chinese sentences of varied length, padded with ASCII letters to exactly `size` bytes."""
    out, used, i = [], 0, seed
    while True:
        sentence = f"第{i}句" + "话" * (3 + i % 11) + "。"
        if used + utf8_len(sentence) > size:
            break
        out.append(sentence)
        used += utf8_len(sentence)
        i += 1
    out.append("x" * (size - used))
    return "".join(out)


def _notice_free(parts: list[str]) -> None:
    assert not any("截断" in p for p in parts)


def assert_reassembles(parts: list[str], text: str, *, whole: bool = True) -> list[int]:
    """The parts are `text` (stripped) in order, only whitespace between them lost: returns where each ends.
    With whole=False they only need to be a prefix of it."""
    text = text.strip()
    at, ends = 0, []
    for part in parts:
        assert part and part == part.strip()
        assert text.startswith(part, at), (part, text[at : at + len(part) + 10])
        at += len(part)
        ends.append(at)
        while at < len(text) and text[at].isspace():
            at += 1
    if whole:
        assert at == len(text)
    return ends


def test_the_reported_7000_byte_answer_goes_out_whole_in_four_parts() -> None:
    # As reported: paragraphs of 1739 and 576 bytes, one of 2364 (over a message), one of 2315.
    paragraphs = [_paragraph(1739, 1), _paragraph(576, 2), _paragraph(2364, 3), _paragraph(2315, 4)]
    text = "\n\n".join(paragraphs)
    assert utf8_len(text) == 7000
    parts = split_reply(text)
    _notice_free(parts)
    assert len(parts) == 4  # 7000 bytes need at least 4 messages of 2048
    assert all(utf8_len(p) <= 2048 for p in parts)
    assert_reassembles(parts, text)
    assert parts[0] == paragraphs[0]  # the paragraph break is the best cut the count allows
    assert all(p.endswith(("。", "x")) for p in parts)


def test_a_part_after_an_oversized_paragraph_is_filled() -> None:
    small = "短段落。" * 80  # 960 bytes
    big = "长段落里的一句话。" * 110  # 2970 bytes
    text = f"{small}\n\n{big}\n\n{small}"
    parts = split_reply(text, max_parts=3)
    _notice_free(parts)
    assert len(parts) == 3
    assert_reassembles(parts, text)


def test_equal_counts_prefer_better_cuts_and_then_fuller_early_parts() -> None:
    a, b, c = "甲" * 300, "乙" * 300, "丙。" * 150  # 900 bytes each
    parts = split_reply(f"{a}\n{b}\n\n{c}", max_bytes=2048)
    assert parts == [f"{a}\n{b}", c]  # the paragraph break, not the line break
    parts = split_reply(f"{a}\n\n{b}\n\n{c}", max_bytes=2048)
    assert parts == [f"{a}\n\n{b}", c]  # two paragraph breaks: the first part is filled


def test_a_sentence_end_beats_a_comma_and_a_comma_beats_a_space() -> None:
    text = "first part, still going. second part here"
    assert split_reply(text, max_bytes=30, max_parts=2) == ["first part, still going.", "second part here"]
    text = "甲乙丙，丁戊 己庚辛"
    assert split_reply(text, max_bytes=18, max_parts=2) == ["甲乙丙，", "丁戊 己庚辛"]


def test_numbers_urls_and_emoji_sequences_stay_whole_when_they_can() -> None:
    text = "价格3.14元https://example.com/a"
    parts = split_reply(text, max_bytes=30, max_parts=2)
    assert parts in (["价格3.14元", "https://example.com/a"], ["价格3.14元https", "://example.com/a"])
    assert parts[0] == "价格3.14元"
    family = "👨\u200d👩\u200d👧"  # one emoji of 18 bytes
    parts = split_reply("字" * 5 + family, max_bytes=20, max_parts=2)
    assert parts == ["字" * 5, family]
    accented = "e\u0301" * 10  # 30 bytes: each letter carries a combining accent
    parts = split_reply(accented, max_bytes=7, max_parts=10)
    assert all(p.startswith("e") for p in parts)


def test_over_the_quota_the_cut_is_at_a_boundary_before_the_notice() -> None:
    para = "这是一段很长的话，里面有好几句。" * 40  # 1920 bytes
    text = "\n\n".join([para] * 8)
    parts = split_reply(text, max_parts=3, truncation_notice="\n（已截断）")
    assert len(parts) == 3
    assert parts[:2] == [para, para]
    assert parts[2].endswith("。\n（已截断）")
    assert utf8_len(parts[2]) <= 2048


def test_a_notice_too_big_for_any_text_goes_alone_in_the_last_part() -> None:
    assert split_reply("x" * 20, max_bytes=8, max_parts=2, truncation_notice="~~~~~~") == ["x" * 8, "~~~~~~"]
    assert split_reply("x" * 20, max_bytes=8, max_parts=1, truncation_notice="~~~~~~") == ["~~~~~~"]


def test_hostile_text_is_split_safely() -> None:
    assert split_reply(" " * 100_000 + "a" + "\n" * 100_000 + "b") == ["a", "b"]
    parts = split_reply("字" * 500_000)
    assert len(parts) == 5 and parts[-1].endswith("（回答较长，已截断）")
    assert all(utf8_len(p) <= 2048 for p in parts)
    assert split_reply("a\ud800b\ud83d\ude00") == ["a\ufffdb😀"]  # lone surrogate replaced, pair joined


def test_a_limit_below_one_character_is_refused() -> None:
    with pytest.raises(ValueError):
        split_reply("ok", max_bytes=3)
    with pytest.raises(ValueError):
        take_full_part("ok", 3)


# --- take_full_part: one part at a time while the answer streams in -----------------------------------------


def test_no_part_is_taken_while_everything_may_still_fit_in_one() -> None:
    assert take_full_part("") is None
    assert take_full_part("字" * 682 + "  \n\n ") is None  # 2046 bytes and whitespace
    assert take_full_part("x" * 2048) is None


def test_a_part_ends_at_the_best_boundary_in_the_last_quarter_of_the_window() -> None:
    first = "第一段。" * 150  # 1800 bytes
    second = "第二段的一句话，" * 20 + "还没有说完"  # 495 bytes, no sentence end yet
    taken = take_full_part(f"{first}\n\n{second}")
    assert taken == (first, f"\n\n{second}")
    # Without a paragraph break, the last sentence end that fits wins over a later comma.
    text = "这是一句话。" * 100 + "这一句很长，" * 30
    part, rest = take_full_part(text) or ("", "")
    assert part.endswith("。") and utf8_len(part) == 1800
    assert part + rest == text


def test_a_part_never_ends_where_the_stream_may_continue_the_word() -> None:
    assert take_full_part("x" * 2048 + "y") == ("x" * 2048, "y")
    assert take_full_part("x" * 2049) == ("x" * 2048, "x")
    # A space far back (outside the last quarter) is not worth a part a quarter full.
    assert take_full_part("x" * 10 + " " + "y" * 2040) == ("x" * 10 + " " + "y" * 2037, "yyy")
    assert take_full_part("x" * 2040 + " " + "y" * 10) == ("x" * 2040, " " + "y" * 10)
