"""A signed, encrypted WeCom callback goes in; the Dify answer comes out at the fake WeCom."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from tests.support.stack import KF, Servers, Stack, make_settings, running

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


async def test_url_verification_echoes_the_decrypted_text(stack: Stack) -> None:
    echostr = stack.crypto.encrypt("1288432023552776189")
    sig = stack.crypto.signature("1476416373", "47744683", echostr)
    resp = await stack.client.get(
        "/webhook",
        params={"msg_signature": sig, "timestamp": "1476416373", "nonce": "47744683", "echostr": echostr},
    )
    assert resp.status_code == 200
    assert resp.content == b"1288432023552776189"


async def test_customer_text_is_answered_by_dify(stack: Stack) -> None:
    stack.wecom.world.add_customer_text(KF, "wmCustomer1", "你好")
    resp = await stack.callback()
    assert resp.status_code == 200
    await stack.settle()
    assert stack.replies_to("wmCustomer1") == ["答：你好"]
    chat = stack.dify.chat_requests()
    assert len(chat) == 1
    assert chat[0].json["user"].endswith("wmCustomer1")
    assert chat[0].json["response_mode"] == "streaming"


async def test_retried_and_overlapping_callbacks_answer_once(stack: Stack) -> None:
    stack.wecom.world.add_customer_text(KF, "wmA", "第一个问题")
    for _ in range(4):
        assert (await stack.callback()).status_code == 200
    await stack.settle()
    for _ in range(3):
        assert (await stack.callback()).status_code == 200
    await stack.settle()
    assert stack.replies_to("wmA") == ["答：第一个问题"]
    assert len(stack.dify.chat_requests()) == 1


async def test_a_batch_of_customers_each_answered_in_order_with_context(stack: Stack) -> None:
    customers = [f"wmBatch{i}" for i in range(6)]
    for round_ in range(3):
        for c in customers:
            stack.wecom.world.add_customer_text(KF, c, f"{c}-问题{round_}")
    await stack.callback()
    await stack.settle()
    for c in customers:
        assert stack.replies_to(c) == [f"答：{c}-问题{r}" for r in range(3)]
        asked = [r.json for r in stack.dify.chat_requests() if r.json["user"].endswith(c)]
        assert [a["query"] for a in asked] == [f"{c}-问题{r}" for r in range(3)]
        assert "conversation_id" not in asked[0] or not asked[0]["conversation_id"]
        assert asked[1]["conversation_id"] and asked[1]["conversation_id"] == asked[2]["conversation_id"]


async def test_pagination_reads_every_page(servers: Servers) -> None:
    servers.wecom.world.page_size = 2
    async with running(make_settings(servers), servers) as stack:
        for i in range(7):
            stack.wecom.world.add_customer_text(KF, f"wmPage{i}", f"q{i}")
        stack.wecom.world.inject_empty_pages(KF, 1)
        await stack.callback()
        await stack.settle()
        for i in range(7):
            assert stack.replies_to(f"wmPage{i}") == [f"答：q{i}"]


async def test_history_from_a_first_sync_is_not_replayed(stack: Stack) -> None:
    old = int(time.time()) - 2 * 24 * 3600
    stack.wecom.world.add_customer_text(KF, "wmOld", "昨天的问题", send_time=old)
    stack.wecom.world.add_customer_text(KF, "wmOld", "前天的问题", send_time=old + 60)
    stack.wecom.world.add_customer_text(KF, "wmNew", "现在的问题")
    await stack.callback()
    await stack.settle()
    assert stack.replies_to("wmOld") == []
    assert stack.replies_to("wmNew") == ["答：现在的问题"]
    status = (await stack.client.get("/status", headers=stack.admin_headers())).json()
    assert status["counters"]["ignored_too_old"] == 2


async def test_bad_signature_is_refused_and_starts_no_work(stack: Stack) -> None:
    stack.wecom.world.add_customer_text(KF, "wmX", "hi")
    resp = await stack.callback(signature="0" * 40)
    assert resp.status_code == 403
    await stack.settle()
    assert stack.wecom.sync_calls == 0
    assert stack.wecom.world.sent == []


async def test_garbage_bodies_get_4xx(stack: Stack) -> None:
    for body in (b"", b"not xml", b"<xml><Encrypt>%%%</Encrypt></xml>", b"<xml/>", b"A" * 200_000):
        resp = await stack.callback(body=body)
        assert 400 <= resp.status_code < 500, body[:20]
    assert stack.wecom.sync_calls == 0


async def test_reset_command_confirms_and_starts_a_new_conversation(stack: Stack) -> None:
    stack.wecom.world.add_customer_text(KF, "wmR", "记住我叫小明")
    await stack.callback()
    await stack.settle()
    stack.wecom.world.add_customer_text(KF, "wmR", " 重置 ")
    await stack.callback()
    await stack.settle()
    stack.wecom.world.add_customer_text(KF, "wmR", "我叫什么")
    await stack.callback()
    await stack.settle()
    replies = stack.replies_to("wmR")
    assert replies[0] == "答：记住我叫小明"
    assert "重新开始" in replies[1]
    asked = [r.json for r in stack.dify.chat_requests()]
    assert [a["query"] for a in asked] == ["记住我叫小明", "我叫什么"]
    assert not asked[1].get("conversation_id")


async def test_dify_failure_sends_a_polite_fallback_and_the_next_message_works(stack: Stack) -> None:
    from tests.support.dify_server import Fault

    stack.dify.inject(
        Fault(status=400, body={"code": "provider_quota_exceeded", "message": "quota", "status": 400})
    )
    stack.wecom.world.add_customer_text(KF, "wmF", "第一问")
    await stack.callback()
    await stack.settle()
    stack.wecom.world.add_customer_text(KF, "wmF", "第二问")
    await stack.callback()
    await stack.settle()
    replies = stack.replies_to("wmF")
    assert replies[0].startswith("抱歉")
    assert replies[1] == "答：第二问"


async def test_lost_dify_conversation_is_restarted_transparently(stack: Stack) -> None:
    stack.wecom.world.add_customer_text(KF, "wmG", "一")
    await stack.callback()
    await stack.settle()
    first_id = stack.dify.chat_requests()[-1]
    conversation_id = next(iter(stack.dify.conversations))
    stack.dify.delete_conversation(conversation_id)
    stack.wecom.world.add_customer_text(KF, "wmG", "二")
    await stack.callback()
    await stack.settle()
    assert stack.replies_to("wmG") == ["答：一", "答：二"]
    assert first_id.json["query"] == "一"


async def test_non_text_messages_get_the_please_type_reply(stack: Stack) -> None:
    # A location is asked in words now (tests/e2e/test_message_types.py); a video still is not.
    stack.wecom.world.add_customer_message(KF, "wmI", "video", {"media_id": "MEDIA_VIDEO_1"})
    await stack.callback()
    await stack.settle()
    assert len(stack.replies_to("wmI")) == 1
    assert "文字" in stack.replies_to("wmI")[0]
    assert stack.dify.chat_requests() == []


async def test_servicer_messages_are_not_answered(stack: Stack) -> None:
    stack.wecom.world.add_servicer_text(KF, "wmS", "zhangsan", "您好，我是人工客服")
    await stack.callback()
    await stack.settle()
    assert stack.replies_to("wmS") == []
    assert stack.dify.chat_requests() == []


async def test_long_answers_are_split_within_wecom_limits(servers: Servers) -> None:
    servers.dify.answer = lambda q, h: "\n\n".join(["这是一段很长的回答内容。" * 40] * 8)
    async with running(make_settings(servers), servers) as stack:
        stack.wecom.world.add_customer_text(KF, "wmL", "讲个长的")
        await stack.callback()
        await stack.settle()
        replies = stack.replies_to("wmL")
        assert 1 < len(replies) <= 5
        assert all(len(r.encode()) <= 2048 for r in replies)
        assert "截断" in replies[-1]


async def test_markdown_answers_reach_wechat_as_plain_text(servers: Servers) -> None:
    servers.dify.answer = lambda q, h: "## 标题\n\n**重点**：请看[官网](https://example.com)"
    async with running(make_settings(servers), servers) as stack:
        stack.wecom.world.add_customer_text(KF, "wmM", "md")
        await stack.callback()
        await stack.settle()
        (reply,) = stack.replies_to("wmM")
        assert "**" not in reply and "##" not in reply
        assert "https://example.com" in reply
