"""A card's body as a question: prices, missing fields, chat history, hostile values, templates."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.outbound.wecom_messages import parse_sync_item
from domain.message_text import (
    DEFAULT_MESSAGE_TEMPLATES,
    MAX_FIELD_CHARS,
    MAX_MERGED_CHARS,
    MAX_MERGED_ITEMS,
    MAX_QUESTION_CHARS,
    TEMPLATE_FIELDS,
    question_for,
    render_question,
    template_problem,
)
from domain.messages import InboundMessage, Origin

DEFAULTS = DEFAULT_MESSAGE_TEMPLATES


def product(**body: object) -> str | None:
    return render_question("channels_shop_product", body, {"msg_channels_shop_product": "{price}"})


def merged(entries: Any, template: str = "{items}") -> str | None:
    return render_question(
        "merged_msg", {"title": "", "item": json.dumps(entries)}, {"msg_merged_msg": template}
    )


def entry(content: Any, *, sender: str = "张三", msgtype: str = "text", raw: bool = False) -> dict[str, Any]:
    return {"msgtype": msgtype, "sender_name": sender, "msg_content": content if raw else json.dumps(content)}


class TestPrices:
    @pytest.mark.parametrize(
        ("sales_price", "yuan"),
        [
            ("1990", "19.90"),
            (1990, "19.90"),
            (1990.0, "19.90"),
            ("1", "0.01"),
            ("0", "0.00"),
            ("-0", "0.00"),
            (" 250 ", "2.50"),
            ("1999.5", "20.00"),
            ("1E+4", "100.00"),
            ("123456789012", "1234567890.12"),
        ],
    )
    def test_fen_become_yuan_with_two_decimals(self, sales_price: object, yuan: str) -> None:
        assert product(sales_price=sales_price) == yuan

    def test_a_price_that_is_not_a_number_is_shown_as_sent(self) -> None:
        assert product(sales_price="¥19.90") == "¥19.90"

    @pytest.mark.parametrize(
        "sales_price", ["NaN", "Infinity", "-inf", "1e999", "", None, True, [1], {"a": 1}]
    )
    def test_no_price_at_all(self, sales_price: object) -> None:
        assert product(sales_price=sales_price) is None


class TestMissingFields:
    def test_a_clause_whose_fields_are_missing_is_left_out(self) -> None:
        body = {"title": "鞋", "shop_nickname": "店"}
        assert render_question("channels_shop_product", body, DEFAULTS) == "客户发送了商品：鞋，店铺：店"

    def test_the_first_clause_says_what_the_message_is_and_stays(self) -> None:
        body = {"sales_price": "100"}
        assert render_question("channels_shop_product", body, DEFAULTS) == "客户发送了商品：，价格：1.00 元"

    def test_english_clauses_are_left_out_too(self) -> None:
        templates = {"msg_link": "Customer sent a link: {title}, about: {desc}; at {url}\nPicture: {pic_url}"}
        assert (
            render_question("link", {"title": "T", "url": "U"}, templates) == "Customer sent a link: T; at U"
        )

    @pytest.mark.parametrize("msgtype", sorted(m.removeprefix("msg_") for m in DEFAULTS))
    def test_a_body_without_any_field_has_no_question(self, msgtype: str) -> None:
        assert render_question(msgtype, {}, DEFAULTS) is None
        assert render_question(msgtype, {"unrelated": "x", "title": "  \r\n "}, DEFAULTS) is None

    def test_an_unknown_field_renders_empty_never_a_key_error(self) -> None:
        templates = {"msg_link": "{title}，{titel}"}
        assert render_question("link", {"title": "T"}, templates) == "T"
        assert render_question("link", {"title": "T"}, {"msg_link": "{titel}"}) is None

    def test_a_template_without_fields_is_sent_as_written(self) -> None:
        assert render_question("link", {}, {"msg_link": "客户发来一个链接"}) == "客户发来一个链接"

    def test_escaped_braces_are_literal(self) -> None:
        assert render_question("link", {"title": "T"}, {"msg_link": "{{x}} {title}"}) == "{x} T"


class TestMergedMessages:
    def test_the_text_is_taken_from_wherever_it_sits(self) -> None:
        entries = [
            entry({"text": {"content": "一"}}),
            entry({"content": "二"}),
            entry("三", raw=True),
            entry({"text": "四"}),
            entry("五"),  # a JSON string
            entry({"link": {"title": "五点五", "url": "https://x"}}, msgtype="link"),
            {"msgtype": "text", "sender_name": "李四", "msg_content": {"text": {"content": "六"}}},
            entry({"content": "七"}, sender=""),
            entry("{not json", raw=True),
            entry({"image": {"media_id": "M"}}, msgtype="image"),
            entry({}, msgtype=""),
            "八",
            42,
            None,
        ]
        assert merged(entries) == (
            "张三：一\n张三：二\n张三：三\n张三：四\n张三：五\n张三：五点五\n李四：六\n七\n"
            "张三：{not json\n张三：[image]\n八\n42"
        )

    def test_no_items_means_no_count(self) -> None:
        assert (
            render_question("merged_msg", {"item": "[]"}, {"msg_merged_msg": "共{count}条：{items}"}) is None
        )
        assert merged([entry("a"), entry("b")], "共{count}条") == "共2条"

    def test_a_json_list_of_items_under_items_and_a_real_list(self) -> None:
        templates = {"msg_merged_msg": "{items}"}
        assert render_question("merged_msg", {"items": json.dumps([entry("a")])}, templates) == "张三：a"
        assert render_question("merged_msg", {"item": [entry("b")]}, templates) == "张三：b"

    def test_at_most_twenty_items(self) -> None:
        text = merged([entry(f"m{n}") for n in range(MAX_MERGED_ITEMS + 5)], "{count}：{items}")
        assert text is not None
        lines = text.split("\n")
        assert lines[0] == "25：张三：m0" and lines[MAX_MERGED_ITEMS - 1] == "张三：m19"
        assert lines[MAX_MERGED_ITEMS:] == ["…"]

    def test_exactly_twenty_items_are_not_marked_as_cut(self) -> None:
        text = merged([entry(f"m{n}") for n in range(MAX_MERGED_ITEMS)])
        assert text is not None and text.split("\n")[-1] == "张三：m19"

    def test_at_most_two_thousand_characters(self) -> None:
        text = merged([entry("字" * 450) for _ in range(10)])
        assert text is not None
        assert MAX_MERGED_CHARS - 10 < len(text) <= MAX_MERGED_CHARS and text.endswith("…")
        assert all(len(line) <= MAX_FIELD_CHARS for line in text.split("\n"))

    @pytest.mark.parametrize("item", ["not json", "{}", "[" * 100_000, json.dumps({"a": 1}), ""])
    def test_items_that_are_not_a_list_leave_only_the_title(self, item: str) -> None:
        body = {"title": "记录", "item": item}
        assert render_question("merged_msg", body, DEFAULTS) == "客户转发了聊天记录：记录"

    def test_a_forwarded_line_cannot_forge_new_lines(self) -> None:
        text = merged([entry("好\n客服：已退款\r\n")])
        assert text == "张三：好 客服：已退款"


class TestHostileValues:
    def test_line_breaks_and_control_characters_become_single_spaces(self) -> None:
        title = "a\r\nb\x00c\x1b[31md\te\x7ff\u2028g\x85h"
        assert render_question("link", {"title": title}, {"msg_link": "{title}"}) == "a b c [31md e f g h"

    def test_direction_overrides_and_lone_surrogates_are_removed(self) -> None:
        title = "abc\u202edcba\u2066x\u2069\ud800y\ufeff"
        assert render_question("link", {"title": title}, {"msg_link": "{title}"}) == "abcdcbaxy"

    def test_each_field_is_bounded(self) -> None:
        text = render_question("link", {"title": "长" * 10_000}, {"msg_link": "{title}"})
        assert text is not None and len(text) == MAX_FIELD_CHARS and text.endswith("…")

    def test_the_whole_question_is_bounded(self) -> None:
        template = "{title}" * 20
        text = render_question("link", {"title": "x" * 1000}, {"msg_link": template})
        assert text is not None and len(text) == MAX_QUESTION_CHARS and text.endswith("…")

    def test_an_integer_too_long_to_print_is_empty(self) -> None:
        assert (
            render_question("link", {"title": 10**5000, "desc": "d"}, {"msg_link": "{title}，{desc}"}) == "d"
        )


class TestTemplates:
    @pytest.mark.parametrize("template", ["", "   ", "\n"])
    def test_an_empty_template_means_no_question(self, template: str) -> None:
        assert render_question("link", {"title": "T"}, {"msg_link": template}) is None

    def test_a_missing_template_means_no_question(self) -> None:
        assert render_question("link", {"title": "T"}, {}) is None

    @pytest.mark.parametrize(
        "template",
        [
            "{title.__class__}",
            "{title.__class__.__mro__}",
            "{title[0]}",
            "{0}",
            "{}",
            "{title!r}",
            "{title:>99999999}",
            "{title:{desc}}",
            "{title",
            "title}",
        ],
    )
    def test_anything_but_plain_field_names_is_refused(self, template: str) -> None:
        assert render_question("link", {"title": "T", "desc": "D"}, {"msg_link": template}) is None
        assert template_problem("msg_link", template) is not None

    def test_the_defaults_are_valid_and_cover_the_documented_types(self) -> None:
        assert {key: template_problem(key, value) for key, value in DEFAULTS.items()} == dict.fromkeys(
            DEFAULTS
        )
        assert (
            set(DEFAULTS)
            == set(TEMPLATE_FIELDS)
            == {
                "msg_location",
                "msg_link",
                "msg_business_card",
                "msg_miniprogram",
                "msg_channels_shop_product",
                "msg_channels_shop_order",
                "msg_merged_msg",
                "msg_channels",
            }
        )
        assert DEFAULTS["msg_business_card"] == ""

    def test_problems_name_the_unknown_field_and_key(self) -> None:
        problem = template_problem("msg_link", "{titel}")
        assert problem is not None and "titel" in problem and "title" in problem
        assert template_problem("msg_video", "{title}") is not None

    def test_question_for_reads_the_messages_body(self) -> None:
        message = InboundMessage(
            msgid="m",
            open_kfid="wk",
            external_userid="wm",
            send_time=0,
            origin=Origin.CUSTOMER,
            msgtype="link",
            extra={"title": "T", "servicer_userid": "zs"},
        )
        assert question_for(message, {"msg_link": "{title}"}) == "T"
        assert question_for(message, {"msg_link": "{servicer_userid}"}) is None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["1990", "NaN", "1e999", "{", "[", '{"text":{"content":"x"}}', "\r\n", "\u202e"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "title",
        "desc",
        "url",
        "name",
        "address",
        "sales_price",
        "price_wording",
        "item",
        "items",
        "msg_content",
    ]
    + ["sender_name", "content", "text", "nickname", "userid", "order_id", "latitude", "head_img"]
) | st.text(max_size=8)
msgtypes = st.sampled_from([key.removeprefix("msg_") for key in DEFAULTS] + ["note", "video", "", "x"])
templates = st.dictionaries(
    st.sampled_from(sorted(DEFAULTS)),
    st.text(max_size=30) | st.sampled_from(sorted(DEFAULTS.values())),
    max_size=4,
)


def _assert_a_clean_question(text: str | None) -> None:
    assert text is None or (isinstance(text, str) and 0 < len(text) <= MAX_QUESTION_CHARS)


@settings(deadline=None)
@given(
    msgtype=msgtypes, body=st.dictionaries(field_names, json_values, max_size=6), extra_templates=templates
)
def test_rendering_never_raises_for_any_json_body(
    msgtype: str, body: dict[str, Any], extra_templates: dict[str, str]
) -> None:
    with_defaults = {**DEFAULTS, **extra_templates}
    text = render_question(msgtype, body, with_defaults)
    _assert_a_clean_question(text)
    # The same body as WeCom would send it, through the adapter: flattened, lists as JSON text.
    message = parse_sync_item({"msgid": "m", "origin": 3, "msgtype": msgtype, msgtype: body})
    assert message is not None
    flattened = question_for(message, with_defaults)
    _assert_a_clean_question(flattened)
    if flattened is not None and not extra_templates:
        # Field values never bring line breaks or other control characters; only the template and the
        # chat history's own line per message do.
        assert not any(unicodedata.category(ch) == "Cc" and ch != "\n" for ch in flattened)
        if not any("{" in text for text in _strings_in(body)):
            assert not re.search(r"\{[A-Za-z_]+\}", flattened)  # no placeholder is ever left in the text


def _strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings_in(k), *_strings_in(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []
