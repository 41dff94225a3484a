"""Dify 1.x and WeCom as they are today, end to end through the webhook with the local fakes: non-text
messages asked in words, a paused chatflow, and a resend whose first attempt did land."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.outbound.wecom_paths import SEND_MSG
from application.options import ReplyTexts
from tests.support.dify_server import Fault
from tests.support.stack import KF, Servers, Stack, make_settings, running

pytestmark = pytest.mark.anyio

TEXTS = ReplyTexts()


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


async def customer_sends(stack: Stack, customer: str, msgtype: str, body: dict[str, Any]) -> None:
    stack.wecom.world.add_customer_message(KF, customer, msgtype, body)
    assert (await stack.callback()).status_code == 200
    await stack.settle()


def asked(stack: Stack) -> list[str]:
    return [r.json["query"] for r in stack.dify.chat_requests()]


@pytest.mark.parametrize(
    ("msgtype", "body", "question"),
    [
        (
            "channels_shop_product",
            {
                "product_id": "10000071437447",
                "head_image": "https://wx.qlogo.cn/p.jpg",
                "title": "保温杯 500ml",
                "sales_price": "8990",
                "shop_nickname": "杯子旗舰店",
                "shop_head_image": "https://wx.qlogo.cn/s.jpg",
            },
            "客户发送了商品：保温杯 500ml，价格：89.90 元，店铺：杯子旗舰店",
        ),
        (
            "channels_shop_order",
            {
                "order_id": "3705115058471208928",
                "product_titles": "保温杯 500ml",
                "price_wording": "¥89.90",
                "state": "待发货",
                "image_url": "https://wx.qlogo.cn/o.jpg",
                "shop_nickname": "杯子旗舰店",
            },
            "客户发送了订单：3705115058471208928，商品：保温杯 500ml，金额：¥89.90，"
            "状态：待发货，店铺：杯子旗舰店",
        ),
        (
            "link",
            {
                "title": "退货政策",
                "desc": "七天无理由",
                "url": "https://shop.example.com/returns",
                "pic_url": "https://shop.example.com/p.png",
            },
            "客户发送了链接：退货政策，描述：七天无理由，网址：https://shop.example.com/returns",
        ),
        (
            "location",
            {
                "latitude": 23.1291,
                "longitude": 113.2644,
                "name": "广州塔",
                "address": "广州市海珠区阅江西路222号",
            },
            "客户发送了位置：广州塔，地址：广州市海珠区阅江西路222号",
        ),
        (
            "merged_msg",
            {
                "title": "张三和李四的聊天记录",
                "item": [
                    {
                        "send_time": 1700000000,
                        "msgtype": "text",
                        "sender_name": "张三",
                        "msg_content": json.dumps({"text": {"content": "杯子漏水"}}, ensure_ascii=False),
                    },
                    {
                        "send_time": 1700000060,
                        "msgtype": "text",
                        "sender_name": "李四",
                        "msg_content": json.dumps({"text": {"content": "能换吗"}}, ensure_ascii=False),
                    },
                ],
            },
            "客户转发了聊天记录：张三和李四的聊天记录\n张三：杯子漏水\n李四：能换吗",
        ),
    ],
)
async def test_a_card_is_asked_in_words_and_answered(
    stack: Stack, msgtype: str, body: dict[str, Any], question: str
) -> None:
    await customer_sends(stack, "wmCard", msgtype, body)

    assert asked(stack) == [question]
    assert stack.replies_to("wmCard") == [f"答：{question}"]
    assert stack.container.telemetry().labelled["described_messages"][msgtype] == 1


async def test_a_card_titled_like_a_command_is_only_a_question(stack: Stack) -> None:
    await customer_sends(stack, "wmCmd", "miniprogram", {"title": "转人工", "appid": "wx1", "pagepath": "p"})

    assert asked(stack) == ["客户发送了小程序：转人工"]
    assert stack.replies_to("wmCmd") == ["答：客户发送了小程序：转人工"]
    assert stack.wecom.calls_to("kf/service_state/trans") == []


async def test_an_empty_template_switches_the_type_back_to_unsupported(servers: Servers) -> None:
    settings = make_settings(servers, texts={"msg_link": ""})
    async with running(settings, servers) as stack:
        await customer_sends(stack, "wmLink", "link", {"title": "退货政策", "url": "https://x.example/r"})

        assert asked(stack) == []
        assert stack.replies_to("wmLink") == [TEXTS.unsupported]


async def test_a_video_and_a_business_card_stay_unsupported(stack: Stack) -> None:
    await customer_sends(stack, "wmVideo", "video", {"media_id": "MEDIA_VIDEO_1"})
    await customer_sends(stack, "wmCard2", "business_card", {"userid": "zhangsan"})

    assert asked(stack) == []
    assert stack.replies_to("wmVideo") == [TEXTS.unsupported]
    assert stack.replies_to("wmCard2") == [TEXTS.unsupported]


@pytest.mark.parametrize(("paused_after", "before"), [(0, []), (1, ["答：退款"])])
async def test_a_paused_chatflow_ends_with_the_needs_human_input_text(
    servers: Servers, paused_after: int, before: list[str]
) -> None:
    servers.dify.mode = "advanced-chat"
    async with running(make_settings(servers), servers) as stack:
        stack.dify.inject(Fault(workflow_paused=True, paused_after=paused_after))
        stack.wecom.world.add_customer_text(KF, "wmPause", "退款")
        await stack.callback()
        await stack.settle()

        assert stack.replies_to("wmPause") == [*before, TEXTS.needs_human_input]
        counters = stack.container.telemetry().counters
        assert counters["needs_human_input"] == 1
        assert counters["empty_answers"] == 0 and counters["fallbacks"] == 0


async def test_the_needs_human_input_text_is_configurable(servers: Servers) -> None:
    servers.dify.mode = "advanced-chat"
    async with running(
        make_settings(servers, texts={"needs_human_input": "请稍候，人工审核中。"}), servers
    ) as stack:
        stack.dify.inject(Fault(workflow_paused=True))
        stack.wecom.world.add_customer_text(KF, "wmPause2", "退款")
        await stack.callback()
        await stack.settle()

        assert stack.replies_to("wmPause2") == ["请稍候，人工审核中。"]


async def test_a_resend_whose_first_attempt_landed_counts_as_delivered(stack: Stack) -> None:
    stack.wecom.world.lose_response_next(SEND_MSG)
    stack.wecom.world.add_customer_text(KF, "wmLost", "你好")
    await stack.callback()
    await stack.settle()

    assert stack.replies_to("wmLost") == ["答：你好"]
    sends = stack.wecom.calls_to(SEND_MSG)
    assert len(sends) == 2  # the lost one and one resend: no third attempt
    assert sends[0].body is not None and sends[1].body is not None
    assert sends[0].body["msgid"] == sends[1].body["msgid"]
    counters = stack.container.telemetry().counters
    assert counters["resend_already_delivered"] == 1
    assert counters["replies_sent"] == 1 and counters["answered"] == 1
