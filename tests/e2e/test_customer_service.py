"""Customer-service behaviour end to end: signed callbacks in, fake WeCom and Dify HTTP servers out.

Session ownership, handoff, welcome, fair use and send failures, each as WeCom and Dify would see it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from adapters.inbound.config_file import KfRouteSettings
from adapters.outbound.wecom_paths import (
    SEND_MSG,
    SEND_MSG_ON_EVENT,
    SERVICE_STATE_GET,
    SERVICE_STATE_TRANS,
)
from application.options import ReplyTexts
from domain.messages import CustomerRef
from tests.support.dify_server import Fault
from tests.support.stack import KF, Servers, Stack, extra_dify, fake_servers, make_settings, running

pytestmark = pytest.mark.anyio
TEXTS = ReplyTexts()


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers() as s:
        yield s


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async with running(make_settings(servers), servers) as s:
        yield s


async def say(stack: Stack, customer: str, text: str, *, kf: str = KF, menu_id: str = "") -> None:
    stack.wecom.world.add_customer_text(kf, customer, text, menu_id=menu_id)
    await stack.callback(kf)
    await stack.settle()


def all_texts_sent(stack: Stack) -> list[str]:
    return [s.text for s in stack.wecom.world.sent] + [
        part for s in stack.wecom.world.sent_on_event for part in (s.text, *(c for _, c in s.menu))
    ]


# --- who owns the session --------------------------------------------------------------------------------


async def test_a_human_owned_session_stays_silent_after_the_first_95018(stack: Stack) -> None:
    customer = CustomerRef(KF, "wmHuman")
    await say(stack, "wmHuman", "你好")
    assert stack.replies_to("wmHuman") == ["答：你好"]
    # A servicer takes the session in the WeCom client; this instance sees no event about it.
    stack.wecom.world.add_servicer("zhangsan")
    stack.wecom.world.set_service_state(customer, 3, "zhangsan")
    for text in ("还在吗", "人呢", "喂"):
        await say(stack, "wmHuman", text)
    assert stack.replies_to("wmHuman") == ["答：你好"]
    send_errcodes = [c.errcode for c in stack.wecom.calls_to(SEND_MSG)]
    assert send_errcodes == [0, 95018]  # one 95018, then no attempt at all
    assert len(stack.wecom.calls_to(SERVICE_STATE_GET)) == 1
    telemetry = stack.container.telemetry()
    assert telemetry.counters["replies_suppressed_human"] == 3
    assert not telemetry.labelled.get("wecom_errors")


async def test_a_queued_session_stays_silent(stack: Stack) -> None:
    stack.wecom.world.set_service_state(CustomerRef(KF, "wmQueue"), 2)
    await say(stack, "wmQueue", "排队中还能问吗")
    assert stack.replies_to("wmQueue") == []
    assert stack.wecom.calls_to(SEND_MSG) == []
    assert stack.dify.chat_requests() == []


async def test_the_bot_steps_back_for_a_servicer_and_returns_when_the_session_ends(stack: Stack) -> None:
    stack.wecom.world.add_servicer("zhangsan")
    await say(stack, "wmBack", "第一问")
    stack.wecom.world.add_event(
        KF, "session_status_change", external_userid="wmBack", change_type=1, new_servicer_userid="zhangsan"
    )
    await say(stack, "wmBack", "给人工的话")
    stack.wecom.world.add_servicer_text(KF, "wmBack", "zhangsan", "您好，我是张三")
    stack.wecom.world.add_event(
        KF, "session_status_change", external_userid="wmBack", change_type=3, old_servicer_userid="zhangsan"
    )
    await say(stack, "wmBack", "再问机器人")
    assert stack.replies_to("wmBack") == ["答：第一问", "答：再问机器人"]
    assert [c.errcode for c in stack.wecom.calls_to(SEND_MSG)] == [0, 0]  # never a 95018
    assert len(stack.wecom.calls_to(SERVICE_STATE_GET)) == 1
    assert [r.json["query"] for r in stack.dify.chat_requests()] == ["第一问", "再问机器人"]


# --- handoff ---------------------------------------------------------------------------------------------


async def test_a_handoff_keyword_transfers_and_notifies_with_the_msg_code(stack: Stack) -> None:
    await say(stack, "wmKey", "转人工")
    (trans,) = stack.wecom.calls_to(SERVICE_STATE_TRANS)
    assert trans.body is not None and trans.body["service_state"] == 2 and trans.errcode == 0
    (notice,) = stack.wecom.world.sent_on_event
    assert notice.text == TEXTS.handoff and notice.customer == CustomerRef(KF, "wmKey")
    (on_event,) = stack.wecom.calls_to(SEND_MSG_ON_EVENT)
    assert on_event.body is not None and on_event.body["code"] == notice.code
    assert stack.wecom.world.sent == [] and stack.dify.chat_requests() == []
    # Queued now: the customer's next words are for the human.
    await say(stack, "wmKey", "我等着")
    assert stack.wecom.world.sent == []


async def test_a_marker_in_the_answer_hands_off_and_is_never_shown(servers: Servers) -> None:
    servers.dify.answer = lambda q, h: "**这个问题**需要人工处理，请稍候。\n\n[[转人工]]"
    async with running(make_settings(servers), servers) as stack:
        await say(stack, "wmMark", "我要退款")
        assert stack.replies_to("wmMark") == ["这个问题需要人工处理，请稍候。"]
        assert [s.text for s in stack.wecom.world.sent_on_event] == [TEXTS.handoff]
        assert all("转人工]]" not in text and "[[" not in text for text in all_texts_sent(stack))
        assert stack.wecom.world.get_state(CustomerRef(KF, "wmMark")).state == 2


async def test_a_handoff_to_a_configured_servicer(servers: Servers) -> None:
    servers.wecom.world.add_servicer("zhangsan")
    settings = make_settings(servers, servicer_userid="zhangsan", texts={"handoff": "张三马上为您服务"})
    async with running(settings, servers) as stack:
        await say(stack, "wmSvc", "人工客服")
        (trans,) = stack.wecom.calls_to(SERVICE_STATE_TRANS)
        assert trans.body is not None
        assert (trans.body["service_state"], trans.body["servicer_userid"]) == (3, "zhangsan")
        assert [s.text for s in stack.wecom.world.sent_on_event] == ["张三马上为您服务"]


async def test_a_refused_handoff_gets_a_polite_text_and_a_warning(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kfdify")
    async with running(make_settings(servers, servicer_userid="not_a_servicer"), servers) as stack:
        await say(stack, "wmRefused", "转人工")
        assert stack.replies_to("wmRefused") == [TEXTS.handoff_failed]
        assert stack.wecom.world.sent_on_event == []
        warning = [
            r for r in caplog.records if r.levelno == logging.WARNING and "handoff refused" in r.getMessage()
        ]
        assert len(warning) == 1 and "errcode=95014" in warning[0].getMessage()
        assert stack.container.telemetry().labelled["handoff_failures"]["95014"] == 1
        await say(stack, "wmRefused", "那算了")
        assert stack.replies_to("wmRefused")[-1] == "答：那算了"


# --- welcome ---------------------------------------------------------------------------------------------


async def test_a_configured_welcome_is_sent_with_the_welcome_code(servers: Servers) -> None:
    async with running(
        make_settings(servers, texts={"welcome": "欢迎光临，有什么可以帮您？"}), servers
    ) as stack:
        _, code = stack.wecom.world.add_enter_session(KF, "wmWelcome")
        await stack.callback()
        await stack.settle()
        (welcome,) = stack.wecom.world.sent_on_event
        assert (welcome.code, welcome.text, welcome.menu) == (code, "欢迎光临，有什么可以帮您？", ())
        assert stack.wecom.world.sent == []


async def test_the_opening_statement_comes_with_a_menu_of_suggested_questions_and_a_click_is_answered() -> (
    None
):
    questions = ["怎么退货？", "运费多少？", "多久发货？"]
    with fake_servers(opening_statement="你好，我是**小助手**。", suggested_questions=questions) as servers:
        async with running(make_settings(servers), servers) as stack:
            stack.wecom.world.add_enter_session(KF, "wmMenu")
            await stack.callback()
            await stack.settle()
            (welcome,) = stack.wecom.world.sent_on_event
            assert welcome.text == "你好，我是小助手。"
            assert [content for _, content in welcome.menu] == questions
            body = stack.wecom.calls_to(SEND_MSG_ON_EVENT)[0].body
            assert body is not None and body["msgtype"] == "msgmenu"
            # The customer taps the second item: it arrives as a text with its menu_id.
            item_id, content = welcome.menu[1]
            await say(stack, "wmMenu", content, menu_id=item_id)
            assert stack.replies_to("wmMenu") == ["答：运费多少？"]
            assert stack.dify.chat_requests()[-1].json["query"] == "运费多少？"


async def test_an_old_enter_session_gets_no_welcome(servers: Servers) -> None:
    async with running(make_settings(servers, texts={"welcome": "欢迎"}), servers) as stack:
        stack.wecom.world.add_enter_session(KF, "wmLate", send_time=int(time.time()) - 30)
        await stack.callback()
        await stack.settle()
        assert stack.wecom.calls_to(SEND_MSG_ON_EVENT) == []
        assert stack.container.telemetry().labelled["welcomes_skipped"]["stale"] == 1


async def test_an_expired_welcome_code_is_refused_quietly(servers: Servers) -> None:
    servers.wecom.world.welcome_code_ttl_s = 0.0  # WeCom says the code is no longer valid
    async with running(make_settings(servers, texts={"welcome": "欢迎"}), servers) as stack:
        stack.wecom.world.add_enter_session(KF, "wmExpired")
        await stack.callback()
        await stack.settle()
        assert stack.wecom.world.sent_on_event == []
        assert [c.errcode for c in stack.wecom.calls_to(SEND_MSG_ON_EVENT)] == [95007]
        assert stack.container.telemetry().labelled["welcomes_skipped"]["wecom_error"] == 1
        await say(stack, "wmExpired", "你好")
        assert stack.replies_to("wmExpired") == ["答：你好"]


# --- several kf accounts ---------------------------------------------------------------------------------


async def test_two_kf_accounts_use_two_dify_apps_and_keep_conversations_apart(servers: Servers) -> None:
    second_kf, unlisted_kf = "wkSECOND0002", "wkUNLISTED03"
    with extra_dify(api_key="app-second-key", answer=lambda q, h: f"售后{len(h) + 1}：{q}") as (dify2, url2):
        route = KfRouteSettings(
            second_kf,
            url2,
            dify2.api_key,
            {"welcome": "欢迎来到售后", "fallback": "售后助手暂时忙"},
        )
        settings = make_settings(servers, kf_routes=(route,), texts={"welcome": "欢迎来到售前"})
        async with running(settings, servers) as stack:
            for kf in (KF, second_kf, unlisted_kf):
                stack.wecom.world.add_enter_session(kf, "wmSame")
                await say(stack, "wmSame", "一", kf=kf)
                await say(stack, "wmSame", "二", kf=kf)
            by_kf = {
                kf: [s.text for s in stack.wecom.world.sent if s.customer.open_kfid == kf]
                for kf in (KF, second_kf, unlisted_kf)
            }
            assert by_kf == {
                KF: ["答：一", "答：二"],
                second_kf: ["售后1：一", "售后2：二"],
                unlisted_kf: ["答：一", "答：二"],
            }
            welcomes = {w.customer.open_kfid: w.text for w in stack.wecom.world.sent_on_event}
            assert welcomes == {KF: "欢迎来到售前", second_kf: "欢迎来到售后", unlisted_kf: "欢迎来到售前"}
            # One conversation per kf account and customer, each in its own app.
            assert len(dify2.chat_requests()) == 2 and len(stack.dify.chat_requests()) == 4
            users = {r.json["user"] for r in stack.dify.chat_requests()}
            assert users == {
                CustomerRef(KF, "wmSame").dify_user(),
                CustomerRef(unlisted_kf, "wmSame").dify_user(),
            }
            assert len(stack.dify.conversations) == 2 and len(dify2.conversations) == 1
            # A failure of the second app answers with that account's own fallback text.
            dify2.inject(
                Fault(status=400, body={"code": "provider_quota_exceeded", "message": "q", "status": 400})
            )
            await say(stack, "wmSame", "三", kf=second_kf)
            assert [s.text for s in stack.wecom.world.sent if s.customer.open_kfid == second_kf][
                -1
            ] == "售后助手暂时忙"


# --- fair use --------------------------------------------------------------------------------------------


async def test_over_the_rate_limit_one_notice_and_dify_is_spared(servers: Servers) -> None:
    async with running(make_settings(servers, rate_limit=2, rate_limit_window_s=60), servers) as stack:
        for i in range(5):
            stack.wecom.world.add_customer_text(KF, "wmFast", f"问{i}")
        await stack.callback()
        await stack.settle()
        await say(stack, "wmFast", "又一条")
        assert stack.replies_to("wmFast") == ["答：问0", "答：问1", TEXTS.rate_limited]
        assert len(stack.dify.chat_requests()) == 2
        await say(stack, "wmOther", "别人不受影响")
        assert stack.replies_to("wmOther") == ["答：别人不受影响"]


# --- send failures ---------------------------------------------------------------------------------------


async def test_msg_send_fail_is_logged_and_a_rejecting_customer_is_remembered(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kfdify")
    async with running(make_settings(servers, texts={"welcome": "欢迎回来"}), servers) as stack:
        await say(stack, "wmReject", "你好")
        sent_msgid = stack.wecom.world.sent[0].msgid
        stack.wecom.world.add_event(
            KF, "msg_send_fail", external_userid="wmReject", fail_msgid=sent_msgid, fail_type=10
        )
        stack.wecom.world.add_event(
            KF, "msg_send_fail", external_userid="wmOther", fail_msgid="x1", fail_type=99
        )
        stack.wecom.world.add_enter_session(KF, "wmReject")
        await stack.callback()
        await stack.settle()
        assert stack.wecom.world.sent_on_event == []  # no welcome for a customer who refuses our messages
        telemetry = stack.container.telemetry()
        assert telemetry.labelled["send_failures"] == {"10": 1, "99": 1}
        assert telemetry.labelled["welcomes_skipped"]["rejected"] == 1
        lines = [r.getMessage() for r in caplog.records if "could not deliver" in r.getMessage()]
        assert any(sent_msgid in line and "fail_type=10" in line and "rejected" in line for line in lines)
        assert any("fail_type=99" in line and "undocumented" in line for line in lines)
        # Their own next message clears it.
        await say(stack, "wmReject", "我又来了")
        assert stack.replies_to("wmReject") == ["答：你好", "答：我又来了"]
