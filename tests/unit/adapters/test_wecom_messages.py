"""sync_msg items → domain messages (docs/wecom-kf.md §5.2–5.4), including odd shapes WeCom and SDKs have
shown."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.outbound.wecom_messages import parse_sync_item, to_sync_item
from domain.messages import InboundMessage, KfEvent, Kind, Origin

KF = "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q"
USER = "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"


def item(msgtype: str, body: Any = None, **common: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "msgid": "from_msgid_4622416642169452483",
        "open_kfid": KF,
        "external_userid": USER,
        "send_time": 1615478585,
        "origin": 3,
        "msgtype": msgtype,
    }
    if body is not None:
        base[msgtype] = body
    base.update(common)
    return base


def event_item(**event: Any) -> dict[str, Any]:
    return {"msgid": "ev1", "send_time": 1615478585, "origin": 4, "msgtype": "event", "event": event}


def parse(raw: object) -> InboundMessage:
    message = parse_sync_item(raw)
    assert message is not None
    return message


class TestMessages:
    def test_a_customer_text(self) -> None:
        message = parse(item("text", {"content": "你好"}))
        assert message == InboundMessage(
            msgid="from_msgid_4622416642169452483",
            open_kfid=KF,
            external_userid=USER,
            send_time=1615478585,
            origin=Origin.CUSTOMER,
            msgtype="text",
            text="你好",
        )
        assert message.kind is Kind.TEXT and message.is_from_customer

    def test_a_menu_click_reply_carries_the_menu_id(self) -> None:
        message = parse(item("text", {"content": "转人工", "menu_id": "human"}))
        assert (message.text, message.menu_id) == ("转人工", "human")

    @pytest.mark.parametrize("msgtype", ["image", "voice", "video", "file"])
    def test_media_keeps_the_media_id(self, msgtype: str) -> None:
        message = parse(item(msgtype, {"media_id": "2iSLeVyqzk4eX0IB5kTi9Ljfa2rt9dwfq5WKRQ4Nvvgw"}))
        assert message.media_id == "2iSLeVyqzk4eX0IB5kTi9Ljfa2rt9dwfq5WKRQ4Nvvgw"
        assert message.kind is Kind(msgtype) and message.summary == ""

    def test_a_location_is_summarised(self) -> None:
        body = {
            "latitude": 23.106021881103501,
            "longitude": 113.320503234863,
            "name": "广州国际媒体港",
            "address": "海珠区",
        }
        message = parse(item("location", body))
        assert message.kind is Kind.LOCATION
        assert message.summary == "[位置] 广州国际媒体港 海珠区 (23.106022,113.320503)"
        assert message.extra["name"] == "广州国际媒体港" and message.extra["latitude"].startswith("23.106")

    def test_a_location_with_string_coordinates_and_no_name(self) -> None:
        message = parse(item("location", {"latitude": "39.9", "longitude": "116.4"}))
        assert message.summary == "[位置] (39.9,116.4)"

    def test_a_location_without_coordinates(self) -> None:
        assert parse(item("location", {"name": "家"})).summary == "[位置] 家"

    def test_a_link_is_summarised(self) -> None:
        body = {
            "title": "标题",
            "desc": "描述",
            "url": "https://example.com/a",
            "pic_url": "https://example.com/p",
        }
        message = parse(item("link", body))
        assert message.summary == "[链接] 标题 https://example.com/a"
        assert message.extra["desc"] == "描述"

    @pytest.mark.parametrize(
        ("msgtype", "body", "summary"),
        [
            ("business_card", {"userid": "zhangsan"}, "[名片] zhangsan"),
            ("business_card", {"user_id": "lisi"}, "[名片] lisi"),
            (
                "miniprogram",
                {"title": "小程序", "appid": "wx1", "pagepath": "pages/a.html"},
                "[小程序] 小程序 pages/a.html",
            ),
            (
                "msgmenu",
                {
                    "head_content": "请选择",
                    "list": [
                        {"type": "click", "click": {"id": "1", "content": "满意"}},
                        {"type": "view", "view": {"url": "https://x", "content": "看看"}},
                        "junk",
                    ],
                    "tail_content": "谢谢",
                },
                "[菜单] 请选择 满意 / 看看 谢谢",
            ),
            ("channels_shop_product", {"product_id": "p1", "title": "鞋", "sales_price": "100"}, "[商品] 鞋"),
            (
                "channels_shop_order",
                {"order_id": "o1", "product_titles": "鞋", "price_wording": "1元"},
                "[订单] 鞋 1元",
            ),
            ("merged_msg", {"title": "聊天记录", "item": [{"msgtype": "text"}]}, "[聊天记录] 聊天记录"),
            ("channels", {"sub_type": 1, "nickname": "号", "title": "视频"}, "[视频号] 号 视频"),
            ("meeting", {"meetingid": "m1"}, "[meeting]"),
            ("brand_new_type", None, "[brand_new_type]"),
        ],
    )
    def test_other_types_keep_their_msgtype_and_get_a_summary(
        self, msgtype: str, body: dict[str, Any] | None, summary: str
    ) -> None:
        message = parse(item(msgtype, body))
        assert (message.msgtype, message.summary, message.text) == (msgtype, summary, "")
        assert message.kind is (Kind.OTHER if msgtype not in ("location", "link") else Kind(msgtype))

    def test_nested_and_list_fields_are_flattened_into_extra(self) -> None:
        message = parse(item("merged_msg", {"title": "t", "item": [{"a": 1}], "meta": {"k": 2}}))
        assert message.extra["item"] == '[{"a": 1}]'
        assert message.extra["meta.k"] == "2"

    def test_a_servicer_message_keeps_the_servicer(self) -> None:
        message = parse(item("text", {"content": "人工"}, origin=5, servicer_userid="zhangsan"))
        assert message.origin is Origin.SERVICER and message.is_from_servicer and not message.is_from_customer
        assert message.extra["servicer_userid"] == "zhangsan"


class TestEvents:
    def test_enter_session_with_welcome_code_and_channels(self) -> None:
        message = parse(
            event_item(
                event_type="enter_session",
                open_kfid=KF,
                external_userid=USER,
                scene="123",
                scene_param="abc%3D1",
                welcome_code="aaaaaa",
                wechat_channels={"nickname": "进入会话的视频号名称", "scene": 1},
            )
        )
        assert (message.open_kfid, message.external_userid, message.origin) == (KF, USER, Origin.SYSTEM)
        assert message.is_event and not message.is_from_customer
        assert message.event == KfEvent(
            event_type="enter_session",
            open_kfid=KF,
            external_userid=USER,
            welcome_code="aaaaaa",
            scene="123",
            scene_param="abc%3D1",
        )
        assert message.extra["wechat_channels.nickname"] == "进入会话的视频号名称"
        assert message.extra["wechat_channels.scene"] == "1"

    def test_msg_send_fail(self) -> None:
        ev = parse(
            event_item(
                event_type="msg_send_fail", open_kfid=KF, external_userid=USER, fail_msgid="m", fail_type=10
            )
        )
        assert ev.event is not None and (ev.event.fail_msgid, ev.event.fail_type) == ("m", 10)

    def test_servicer_status_change(self) -> None:
        ev = parse(
            event_item(
                event_type="servicer_status_change", servicer_userid="zs", open_kfid=KF, status=2, stop_type=1
            )
        )
        assert ev.event == KfEvent("servicer_status_change", open_kfid=KF, servicer_userid="zs", status=2)
        assert ev.external_userid == "" and ev.extra["stop_type"] == "1"

    @pytest.mark.parametrize(
        ("change_type", "fields"),
        [
            (1, {"new_servicer_userid": "zs", "msg_code": "c1"}),
            (2, {"old_servicer_userid": "zs", "new_servicer_userid": "ls"}),
            (3, {"old_servicer_userid": "ls", "msg_code": "c3"}),
            (4, {"old_servicer_userid": "ls", "new_servicer_userid": "zs"}),
        ],
    )
    def test_session_status_change(self, change_type: int, fields: dict[str, Any]) -> None:
        raw = event_item(
            event_type="session_status_change",
            open_kfid=KF,
            external_userid=USER,
            change_type=change_type,
            **fields,
        )
        message = parse(raw)
        assert message.event == KfEvent(
            "session_status_change", open_kfid=KF, external_userid=USER, change_type=change_type, **fields
        )

    def test_user_and_servicer_recall(self) -> None:
        user = parse(
            event_item(event_type="user_recall_msg", open_kfid=KF, external_userid=USER, recall_msgid="r1")
        )
        servicer = parse(
            event_item(
                event_type="servicer_recall_msg",
                open_kfid=KF,
                external_userid=USER,
                recall_msgid="r2",
                servicer_userid="zs",
            )
        )
        assert user.event is not None and user.event.recall_msgid == "r1"
        assert servicer.event is not None and (
            servicer.event.recall_msgid,
            servicer.event.servicer_userid,
        ) == (
            "r2",
            "zs",
        )

    def test_reject_customer_msg_switch_change(self) -> None:
        message = parse(
            event_item(
                event_type="reject_customer_msg_switch_change",
                servicer_userid="zs",
                open_kfid=KF,
                external_userid=USER,
                reject_switch=1,
            )
        )
        assert message.event is not None and message.event.event_type == "reject_customer_msg_switch_change"
        assert message.extra["reject_switch"] == "1"

    def test_numbers_as_strings_are_coerced(self) -> None:
        raw = event_item(
            event_type="msg_send_fail", open_kfid=KF, external_userid=USER, fail_type="6", fail_msgid=7
        )
        raw.update(send_time="1615478585", origin="4")
        message = parse(raw)
        assert (message.send_time, message.origin) == (1615478585, Origin.SYSTEM)
        assert message.event is not None and (message.event.fail_type, message.event.fail_msgid) == (6, "7")

    def test_garbage_numbers_become_none(self) -> None:
        message = parse(event_item(event_type="session_status_change", change_type="soon", status=None))
        assert (
            message.event is not None and message.event.change_type is None and message.event.status is None
        )

    def test_an_event_without_its_body_still_parses(self) -> None:
        message = parse({"msgid": "e", "msgtype": "event", "origin": 4})
        assert message.event == KfEvent(event_type="")
        assert message.is_event and message.open_kfid == ""


class TestOddInputs:
    @pytest.mark.parametrize(
        "raw", [None, "text", 42, [], {}, {"msgid": ""}, {"msgid": None, "msgtype": "text"}]
    )
    def test_unidentifiable_items_are_skipped(self, raw: object) -> None:
        assert parse_sync_item(raw) is None

    def test_a_numeric_msgid_becomes_a_string(self) -> None:
        assert parse(item("text", {"content": "x"}, msgid=123)).msgid == "123"

    @pytest.mark.parametrize("origin", [None, "x", 99, 3.5])
    def test_an_odd_origin_is_unknown_or_coerced(self, origin: object) -> None:
        assert parse(item("text", {"content": "x"}, origin=origin)).origin in (
            Origin.UNKNOWN,
            Origin.CUSTOMER,
        )

    def test_missing_fields_default_to_empty(self) -> None:
        message = parse({"msgid": "m"})
        assert (message.msgtype, message.send_time, message.origin, message.summary) == (
            "",
            0,
            Origin.UNKNOWN,
            "[未知消息]",
        )

    @pytest.mark.parametrize("body", ["hello", ["a"], 5, {"content": None}, {"content": {"nested": 1}}])
    def test_a_malformed_text_body_gives_empty_text(self, body: object) -> None:
        assert parse(item("text", body)).text == ""

    def test_a_text_content_number_becomes_a_string(self) -> None:
        assert parse(item("text", {"content": 12.0})).text == "12"

    def test_a_float_send_time_string(self) -> None:
        assert parse(item("text", {"content": "x"}, send_time="1615478585.0")).send_time == 1615478585


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
msgtypes = st.sampled_from(["text", "image", "location", "link", "event", "msgmenu", "x", ""])


@settings(deadline=None)  # about what parsing returns, not how fast: no deadline on a loaded machine
@given(
    raw=st.fixed_dictionaries(
        {},
        optional={
            "msgid": json_values,
            "msgtype": msgtypes | json_values,
            "origin": json_values,
            "send_time": json_values,
            "open_kfid": json_values,
            "text": json_values,
            "location": json_values,
            "event": json_values,
            "msgmenu": json_values,
        },
    )
)
def test_parse_never_raises(raw: dict[str, Any]) -> None:
    message = parse_sync_item(raw)
    assert message is None or isinstance(message, InboundMessage)


ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20)
words = st.text(max_size=30)
events = st.builds(
    KfEvent,
    event_type=st.sampled_from(
        ["enter_session", "msg_send_fail", "session_status_change", "user_recall_msg"]
    ),
    open_kfid=st.just(KF),
    external_userid=st.sampled_from([USER, ""]),
    welcome_code=words,
    scene=words,
    scene_param=words,
    fail_msgid=words,
    fail_type=st.none() | st.integers(0, 12),
    change_type=st.none() | st.integers(1, 4),
    msg_code=words,
    servicer_userid=words,
    old_servicer_userid=words,
    new_servicer_userid=words,
    recall_msgid=words,
    status=st.none() | st.integers(1, 2),
)


@st.composite
def messages(draw: st.DrawFn) -> InboundMessage:
    msgtype = draw(st.sampled_from(["text", "image", "voice", "video", "file", "event"]))
    event = draw(events) if msgtype == "event" else None
    return InboundMessage(
        msgid=draw(ids),
        open_kfid=KF,
        external_userid=event.external_userid if event else USER,
        send_time=draw(st.integers(0, 2**40)),
        origin=Origin.SYSTEM if event else draw(st.sampled_from([Origin.CUSTOMER, Origin.SERVICER])),
        msgtype=msgtype,
        text=draw(words) if msgtype == "text" else "",
        menu_id=draw(words) if msgtype == "text" else "",
        media_id=draw(ids) if msgtype not in ("text", "event") else "",
        event=event,
    )


@given(message=messages())
def test_to_sync_item_round_trips(message: InboundMessage) -> None:
    assert parse_sync_item(to_sync_item(message)) == message


def test_to_sync_item_rebuilds_a_location_from_extra() -> None:
    original = parse(
        item("location", {"latitude": 39.9, "longitude": 116.4, "name": "家", "address": "北京"})
    )
    again = parse(to_sync_item(original))
    assert (again.summary, again.extra) == (original.summary, original.extra)
