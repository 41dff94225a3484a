"""The welcome's content and limits; what msg_send_fail means; how long a refusal lasts."""

from __future__ import annotations

from domain.delivery import CUSTOMER_REJECTED, Rejection, describe_fail_type, means_customer_rejects
from domain.replies import utf8_len
from domain.welcome import (
    CLICK_CONTENT_MAX_BYTES,
    MENU_HEAD_MAX_BYTES,
    MENU_MAX_ITEMS,
    Welcome,
    compose_welcome,
    menu_items,
)


def test_the_configured_text_wins_and_is_a_plain_text() -> None:
    welcome = compose_welcome(
        configured="欢迎光临！", opening_statement="我是AI助手", suggested_questions=["a"]
    )
    assert welcome == Welcome("欢迎光临！")


def test_the_opening_statement_with_suggested_questions_is_a_menu() -> None:
    welcome = compose_welcome(
        configured="",
        opening_statement="你好，我是小助手。",
        suggested_questions=["怎么退货？", "运费多少？"],
    )
    assert welcome == Welcome("你好，我是小助手。", (("q1", "怎么退货？"), ("q2", "运费多少？")))


def test_the_opening_statement_alone_is_a_text() -> None:
    assert compose_welcome(configured="", opening_statement="你好", suggested_questions=[]) == Welcome("你好")


def test_nothing_to_say_sends_nothing() -> None:
    assert compose_welcome(configured="  ", opening_statement="", suggested_questions=["问题"]) is None


def test_menu_limits_are_kept() -> None:
    questions = [f"第{i}个问题" + "很长" * 100 for i in range(15)]
    welcome = compose_welcome(configured="", opening_statement="开场白" * 500, suggested_questions=questions)
    assert welcome is not None
    assert utf8_len(welcome.text) <= MENU_HEAD_MAX_BYTES
    assert len(welcome.menu) == MENU_MAX_ITEMS
    assert all(utf8_len(content) <= CLICK_CONTENT_MAX_BYTES for _, content in welcome.menu)
    assert all(1 <= utf8_len(item_id) <= 128 for item_id, _ in welcome.menu)
    assert welcome.menu[0][1].startswith("第0个问题")


def test_blank_and_repeated_questions_are_dropped() -> None:
    assert menu_items(["", "  ", "同一个", "同一个", "另一个"]) == (("q1", "同一个"), ("q2", "另一个"))


def test_a_long_plain_welcome_fits_one_text_message() -> None:
    welcome = compose_welcome(configured="欢迎" * 2000, opening_statement="")
    assert welcome is not None and utf8_len(welcome.text) <= 2048


def test_fail_types_are_described_and_unknown_ones_generically() -> None:
    assert "rejected" in describe_fail_type(10)
    assert "48 h" in describe_fail_type(4)
    assert describe_fail_type(77) == "undocumented fail_type 77"
    assert describe_fail_type(None) == "no fail_type given"
    assert means_customer_rejects(CUSTOMER_REJECTED) and not means_customer_rejects(6)


def test_a_refusal_lasts_until_it_expires_or_the_customer_writes_again() -> None:
    rejection = Rejection(at=1000, until=1000 + 86400)
    assert rejection.applies(now=2000)
    assert rejection.applies(now=2000, message_time=999)  # a message from before the refusal
    assert not rejection.applies(now=2000, message_time=1001)  # their own later message
    assert not rejection.applies(now=1000 + 86400)
