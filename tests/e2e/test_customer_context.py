"""Issue #17 end to end: the Dify app learns who it is talking to (by its own declaration), conversations are
named after customers, and handoffs right after an answer mark that answer in Dify."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from adapters.outbound.wecom_paths import CUSTOMER_BATCHGET
from tests.support.stack import KF, Servers, Stack, fake_servers, make_settings, running

pytestmark = pytest.mark.anyio

FORM: list[dict[str, Any]] = [
    {"text-input": {"variable": "nickname", "label": "昵称", "required": False, "max_length": 32}},
    {"paragraph": {"variable": "scene_param", "label": "来源页面", "required": False}},
    {"select": {"variable": "gender", "label": "性别", "required": False, "options": ["男", "女", "未知"]}},
    # The customer came from "product": not among this select's options, so never sent.
    {"select": {"variable": "scene", "label": "渠道", "required": False, "options": ["ad", "search"]}},
    {"text-input": {"variable": "lang", "label": "语言", "required": False}},
]


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers() as s:
        yield s


async def say(stack: Stack, customer: str, text: str) -> None:
    stack.wecom.world.add_customer_text(KF, customer, text)
    await stack.callback(KF)
    await settle(stack)


async def settle(stack: Stack) -> None:
    await stack.settle()
    await stack.container.namer().idle()
    await stack.container.handoff_feedback().idle()


def seed_customer(servers: Servers, customer: str = "wmZhang") -> None:
    servers.wecom.world.add_customer_profile(customer, nickname="张三", gender=2, unionid="oUnion-zhang")


async def enters(stack: Stack, customer: str = "wmZhang") -> None:
    """The customer opens the chat from a product page; the service learns who they are meanwhile."""
    stack.wecom.world.add_enter_session(
        KF, customer, scene="product", scene_param=quote("商品页 A-42"), welcome=False
    )
    await stack.callback(KF)
    await settle(stack)
    await stack.container.profiles().idle()


async def test_an_app_that_declares_variables_receives_them(servers: Servers) -> None:
    servers.dify.user_input_form = FORM
    seed_customer(servers)
    settings = make_settings(servers, dify_inputs={"lang": "zh"})
    async with running(settings, servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "这个还有货吗")

        (request,) = stack.dify.chat_requests()
        assert request.json["inputs"] == {
            "lang": "zh",  # [BOT] DIFY_INPUTS still applies
            "nickname": "张三",
            "scene_param": "商品页 A-42",  # URL-decoded
            "gender": "女",
        }
        assert stack.replies_to("wmZhang") == ["答：这个还有货吗"]
        # One batchget for the customer, with the session context asked for.
        (call,) = stack.wecom.calls_to(CUSTOMER_BATCHGET)
        assert call.body == {"external_userid_list": ["wmZhang"], "need_enter_session_context": 1}

        await say(stack, "wmZhang", "那颜色呢")  # the profile is cached: WeCom is not asked again
        assert len(stack.wecom.calls_to(CUSTOMER_BATCHGET)) == 1
        assert stack.dify.chat_requests()[-1].json["inputs"]["nickname"] == "张三"


async def test_dify_inputs_win_for_a_name_they_set(servers: Servers) -> None:
    servers.dify.user_input_form = FORM
    seed_customer(servers)
    async with running(make_settings(servers, dify_inputs={"nickname": "贵宾"}), servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "你好")

        assert stack.dify.chat_requests()[0].json["inputs"]["nickname"] == "贵宾"


async def test_an_app_that_declares_nothing_receives_no_extra_inputs(servers: Servers) -> None:
    seed_customer(servers)
    async with running(make_settings(servers, dify_inputs={"lang": "zh"}), servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "你好")

        (request,) = stack.dify.chat_requests()
        assert request.json["inputs"] == {"lang": "zh"}
        assert stack.replies_to("wmZhang") == ["答：你好"]


async def test_a_failing_batchget_still_answers_and_names_the_errcode(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kfdify")
    servers.dify.user_input_form = FORM
    seed_customer(servers)
    servers.wecom.world.forbidden_apis.add(CUSTOMER_BATCHGET)
    async with running(make_settings(servers), servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "在吗")

        assert stack.replies_to("wmZhang") == ["答：在吗"]
        inputs = stack.dify.chat_requests()[0].json["inputs"]
        assert "nickname" not in inputs and inputs["gender"] == "未知"
        assert inputs["scene_param"] == "商品页 A-42"  # the enter_session event told us anyway
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("batchget" in w and "48002" in w for w in warnings)
        assert stack.container.telemetry().labelled["profile_failures"] == {"48002": 1}


async def test_a_handoff_word_after_an_answer_records_one_dislike(servers: Servers) -> None:
    async with running(make_settings(servers), servers) as stack:
        await say(stack, "wmGiveUp", "怎么退货")
        await say(stack, "wmGiveUp", "转人工")

        (feedback,) = stack.dify.feedbacks
        (answer_id,) = list(stack.dify.answers)
        assert feedback.message_id == answer_id and feedback.rating == "dislike"
        assert "转人工" in feedback.content and feedback.user == f"kf-{KF}-wmGiveUp"
        assert stack.container.telemetry().counters["feedback_recorded"] == 1

        await say(stack, "wmGiveUp", "人工")  # queued now: nothing more to mark
        assert len(stack.dify.feedbacks) == 1


async def test_a_handoff_word_long_after_the_answer_records_nothing(servers: Servers) -> None:
    async with running(make_settings(servers, feedback_window_s=0.0), servers) as stack:
        await say(stack, "wmLater", "怎么退货")
        await say(stack, "wmLater", "转人工")

        assert stack.dify.feedbacks == []


async def test_handoff_feedback_off_records_nothing(servers: Servers) -> None:
    async with running(make_settings(servers, handoff_feedback=False), servers) as stack:
        await say(stack, "wmOff", "怎么退货")
        await say(stack, "wmOff", "转人工")

        assert stack.dify.feedbacks == []
        assert stack.wecom.world.sent_on_event  # the handoff itself happened


async def test_a_marker_handoff_records_nothing(servers: Servers) -> None:
    servers.dify.answer = lambda q, h: "这个需要人工处理。[[转人工]]" if "退款" in q else f"答：{q}"
    async with running(make_settings(servers), servers) as stack:
        await say(stack, "wmMarker", "你好")
        await say(stack, "wmMarker", "我要退款")

        assert stack.dify.feedbacks == []


async def test_a_conversation_is_named_once_after_the_customer(servers: Servers) -> None:
    seed_customer(servers)
    async with running(make_settings(servers), servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "你好")
        await say(stack, "wmZhang", "还在吗")
        await say(stack, "wmNew", "你好")  # wrote at once: named by whatever is known when the answer is out

        renames = [r for r in stack.dify.requests if r.path.endswith("/name")]
        assert len(renames) == 2
        by_user = {r.json["user"]: r.json["name"] for r in renames}
        assert by_user[f"kf-{KF}-wmZhang"] == "微信客户 张三"
        assert by_user[f"kf-{KF}-wmNew"] in ("微信客户 微信用户", "微信客户 wmNew")
        assert set(stack.dify.conversation_names.values()) == set(by_user.values())


async def test_the_conversation_name_template_is_configurable(servers: Servers) -> None:
    seed_customer(servers)
    template = {"conversation_name": "{nickname}（{scene}）"}
    async with running(make_settings(servers, texts=template), servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "你好")

        assert list(stack.dify.conversation_names.values()) == ["张三（product）"]


async def test_the_admin_sees_the_customers_profile_and_entry(servers: Servers) -> None:
    seed_customer(servers)
    async with running(make_settings(servers), servers) as stack:
        await enters(stack)
        await say(stack, "wmZhang", "你好")

        resp = await stack.client.get(
            "/get_conversation", params={"user_id": "wmZhang"}, headers=stack.admin_headers()
        )

        profile = resp.json()["profile"]
        assert (profile["nickname"], profile["gender"], profile["unionid"]) == ("张三", "女", "oUnion-zhang")
        assert profile["entry"]["scene"] == "product" and profile["entry"]["scene_param"] == "商品页 A-42"
        status = (await stack.client.get("/status", headers=stack.admin_headers())).text
        assert "oUnion-zhang" not in status
