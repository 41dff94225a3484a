"""Product and order cards, links, locations, chat history: sync_msg items → body → the question for Dify.

Items are shaped like the documented examples (docs/wecom-kf.md, per-msgtype bodies), including the spellings
that SDKs disagree on. Each must survive what a message goes through before it is answered: the fake WeCom,
the emulator's JSON (`to_sync_item`) and the shared state store.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.outbound import state_codec
from adapters.outbound.fake_wecom import FakeKfChannel
from adapters.outbound.wecom_messages import parse_sync_item, to_sync_item
from domain.message_text import DEFAULT_MESSAGE_TEMPLATES, question_for
from domain.messages import InboundMessage, Kind

KF = "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q"
USER = "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"


def item(msgtype: str, body: Any, **common: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "msgid": "from_msgid_4622416642169452483",
        "open_kfid": KF,
        "external_userid": USER,
        "send_time": 1615478585,
        "origin": 3,
        "msgtype": msgtype,
        msgtype: body,
    }
    raw.update(common)
    return raw


def parse(raw: object) -> InboundMessage:
    message = parse_sync_item(raw)
    assert message is not None
    return message


def question(raw: object, templates: dict[str, str] | None = None) -> str | None:
    return question_for(parse(raw), DEFAULT_MESSAGE_TEMPLATES if templates is None else templates)


def merged_entry(sender: str, msgtype: str, content: Any) -> dict[str, Any]:
    return {
        "send_time": 1615478585,
        "msgtype": msgtype,
        "sender_name": sender,
        "msg_content": json.dumps(content, ensure_ascii=False),
    }


PRODUCT = item(
    "channels_shop_product",
    {
        "product_id": "10000017457793",
        "head_img": "https://wx.qlogo.cn/finderhead/p1.jpg",
        "title": "对对对 小黄鸭T恤",
        "sales_price": "1990",
        "shop_nickname": "小黄鸭旗舰店",
        "shop_head_img": "https://wx.qlogo.cn/finderhead/s1.jpg",
    },
)
ORDER = item(
    "channels_shop_order",
    {
        "order_id": "3705115058471208928",
        "product_titles": "对对对 小黄鸭T恤，黄色鸭舌帽",
        "price_wording": "¥59.80",
        "state": "已发货",
        "image_url": "https://wx.qlogo.cn/o1.jpg",
        "shop_nickname": "小黄鸭旗舰店",
    },
)
LINK = item(
    "link",
    {
        "title": "退货政策",
        "desc": "七天无理由退货说明",
        "url": "https://shop.example.com/returns",
        "pic_url": "https://shop.example.com/p.png",
    },
)
LOCATION = item(
    "location",
    {
        "latitude": 23.106021881103501,
        "longitude": 113.320503234863,
        "name": "广州国际媒体港",
        "address": "海珠区",
    },
)
MINIPROGRAM = item(
    "miniprogram",
    {"title": "小黄鸭商城", "appid": "wxa123", "pagepath": "pages/index.html", "thumb_media_id": "T1"},
)
MERGED = item(
    "merged_msg",
    {
        "title": "张三和李四的聊天记录",
        "item": [
            merged_entry("张三", "text", {"text": {"content": "这件T恤有XL吗？"}}),
            merged_entry("李四", "text", {"content": "有的"}),
            merged_entry("张三", "image", {"image": {"media_id": "M1"}}),
        ],
    },
)
CHANNELS_POST = item("channels", {"sub_type": 1, "nickname": "小黄鸭官方", "title": "新品上市"})


class TestEachTypeBecomesAQuestion:
    def test_a_product_card_with_its_title_price_in_yuan_and_shop(self) -> None:
        assert question(PRODUCT) == "客户发送了商品：对对对 小黄鸭T恤，价格：19.90 元，店铺：小黄鸭旗舰店"

    def test_a_product_card_in_the_other_spelling_with_a_price_as_a_number(self) -> None:
        body = {
            "product_id": "p2",
            "head_image": "https://img/p2.jpg",
            "title": "帽子",
            "sales_price": 2500,
            "shop_nickname": "店",
            "shop_head_image": "https://img/s2.jpg",
        }
        templates = {"msg_channels_shop_product": "{title} {price} {image} {shop_image} {product_id}"}
        assert question(item("channels_shop_product", body), templates) == (
            "帽子 25.00 https://img/p2.jpg https://img/s2.jpg p2"
        )

    def test_an_order_card_with_its_id_products_price_and_state(self) -> None:
        assert question(ORDER) == (
            "客户发送了订单：3705115058471208928，商品：对对对 小黄鸭T恤，黄色鸭舌帽，金额：¥59.80，"
            "状态：已发货，店铺：小黄鸭旗舰店"
        )

    def test_a_link_with_its_title_description_and_url(self) -> None:
        assert question(LINK) == (
            "客户发送了链接：退货政策，描述：七天无理由退货说明，网址：https://shop.example.com/returns"
        )

    def test_a_location_with_its_name_and_address(self) -> None:
        assert question(LOCATION) == "客户发送了位置：广州国际媒体港，地址：海珠区"
        assert question(LOCATION, {"msg_location": "{latitude},{longitude}"}) == "23.106022,113.320503"

    def test_a_mini_program_with_its_title(self) -> None:
        assert question(MINIPROGRAM) == "客户发送了小程序：小黄鸭商城"

    def test_forwarded_chat_history_with_its_title_and_texts(self) -> None:
        assert question(MERGED) == (
            "客户转发了聊天记录：张三和李四的聊天记录\n张三：这件T恤有XL吗？\n李四：有的\n张三：[image]"
        )

    def test_a_channels_post_with_its_title_and_nickname(self) -> None:
        assert question(CHANNELS_POST) == "客户分享了视频号内容，标题：新品上市，视频号：小黄鸭官方"

    def test_a_channels_live_without_a_title(self) -> None:
        live = item("channels", {"sub_type": 2, "nickname": "小黄鸭官方"})
        assert question(live) == "客户分享了视频号内容，视频号：小黄鸭官方"

    def test_a_business_card_keeps_the_unsupported_reply_unless_the_operator_words_it(self) -> None:
        card = item("business_card", {"userid": "zhangsan"})
        assert question(card) is None
        assert question(card, {"msg_business_card": "客户推荐了同事：{userid}"}) == "客户推荐了同事：zhangsan"
        outlier = item("business_card", {"user_id": "lisi"})
        assert question(outlier, {"msg_business_card": "客户推荐了同事：{userid}"}) == "客户推荐了同事：lisi"

    @pytest.mark.parametrize(
        "raw",
        [
            item("note", {"note_id": "n1"}),
            item("video", {"media_id": "V1"}),
            item("meeting", {"meetingid": "m1"}),
            item("brand_new_type", {"title": "新东西"}),
            item("text", {"content": "你好"}),
            {"msgid": "e1", "origin": 4, "msgtype": "event", "event": {"event_type": "enter_session"}},
        ],
    )
    def test_other_types_have_no_question(self, raw: dict[str, Any]) -> None:
        assert question(raw) is None

    def test_a_card_whose_body_is_missing_or_not_an_object_has_no_question(self) -> None:
        assert question(item("channels_shop_product", None)) is None
        assert question(item("link", "https://example.com")) is None
        assert question(item("merged_msg", [1, 2])) is None

    def test_the_kind_of_cards_stays_other(self) -> None:
        assert parse(PRODUCT).kind is Kind.OTHER and parse(LINK).kind is Kind.LINK


RECORDED = [PRODUCT, ORDER, LINK, LOCATION, MINIPROGRAM, MERGED, CHANNELS_POST]


class TestTheBodySurvivesTheWayToTheAnswer:
    @pytest.mark.parametrize("raw", RECORDED, ids=lambda raw: raw["msgtype"])
    def test_the_emulators_json_carries_the_same_body(self, raw: dict[str, Any]) -> None:
        message = parse(raw)
        again = parse(to_sync_item(message))
        assert again.body_fields == message.body_fields
        assert question_for(again, DEFAULT_MESSAGE_TEMPLATES) == question_for(
            message, DEFAULT_MESSAGE_TEMPLATES
        )

    @pytest.mark.parametrize("raw", RECORDED, ids=lambda raw: raw["msgtype"])
    def test_the_emulators_json_is_shaped_like_wecoms(self, raw: dict[str, Any]) -> None:
        msgtype = raw["msgtype"]
        assert to_sync_item(parse(raw))[msgtype] == raw[msgtype]

    def test_nested_objects_come_back_nested(self) -> None:
        raw = item(
            "channels_shop_product", {"title": "鞋", "ext": {"sku": {"color": "红"}}, "a.b": "literal"}
        )
        rebuilt = to_sync_item(parse(raw))["channels_shop_product"]
        assert rebuilt["ext"] == {"sku": {"color": "红"}}
        assert parse(item("channels_shop_product", rebuilt)).body_fields == parse(raw).body_fields

    @pytest.mark.parametrize("raw", RECORDED, ids=lambda raw: raw["msgtype"])
    def test_the_shared_state_store_keeps_the_body(self, raw: dict[str, Any]) -> None:
        message = parse(raw)
        stored = state_codec.decode_messages(state_codec.encode_messages([message]))[0]
        assert question_for(stored, DEFAULT_MESSAGE_TEMPLATES) == question_for(
            message, DEFAULT_MESSAGE_TEMPLATES
        )

    @pytest.mark.anyio
    async def test_the_fake_wecom_serves_a_product_card(self) -> None:
        channel = FakeKfChannel()
        body = PRODUCT["channels_shop_product"]
        msgid = channel.world.add_customer_message(KF, USER, "channels_shop_product", body)
        page = await channel.sync_messages(KF, cursor=None, token=None)
        [message] = [m for m in page.messages if m.msgid == msgid]
        assert message.is_from_customer
        assert question_for(message, DEFAULT_MESSAGE_TEMPLATES) == question(PRODUCT)

    def test_the_servicer_field_is_not_part_of_the_body(self) -> None:
        message = parse(item("link", {"title": "t"}, servicer_userid="zhangsan"))
        assert dict(message.body_fields) == {"title": "t"}
        assert message.extra["servicer_userid"] == "zhangsan"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
card_types = st.sampled_from(
    ["location", "link", "business_card", "miniprogram", "channels_shop_product", "channels_shop_order"]
    + ["merged_msg", "channels", "msgmenu", "note", "x"]
)


@settings(deadline=None)
@given(
    msgtype=card_types,
    body=st.dictionaries(
        st.sampled_from(["item", "sub_type", "latitude", "a", "a.b"]) | st.text(max_size=6),
        json_values,
        max_size=5,
    ),
)
def test_any_body_round_trips_through_the_emulators_json(msgtype: str, body: dict[str, Any]) -> None:
    message = parse(item(msgtype, body))
    again = parse(to_sync_item(message))
    assert again.body_fields == message.body_fields
