"""Customer-service behaviour over the fake-adapter container: session state, handoff, welcome, fair use,
send failures. WeCom is a `KfWorld` (sessions, codes, quota), Dify a `FakeChatEngine`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import pytest
from dependency_injector import providers

import bootstrap
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import SERVICER_STOPPED, FakeKfChannel, KfWorld
from application.options import BotOptions
from application.ports import MessageState, ServiceState
from application.routing import KfRoute, Routing
from application.session_events import SessionEvents
from domain.chat import AppParameters
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef
from tests.support.containers import fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkUnit"


async def run(app: bootstrap.Application, *, kf: str = KF) -> None:
    app.dispatcher().notify(kf, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)
    await asyncio.wait_for(app.observer().idle(), 10)


def texts(world: KfWorld, customer: str) -> list[str]:
    return [s.text for s in world.sent if s.customer.external_userid == customer]


def with_options(app: bootstrap.Application, **changes: Any) -> None:
    app.options.override(providers.Object(dataclasses.replace(app.options(), **changes)))


class CountingChannel(FakeKfChannel):
    """The fake channel, counting service_state/get calls."""

    def __init__(self, world: KfWorld) -> None:
        super().__init__(world)
        self.state_lookups = 0
        self.transfers: list[tuple[CustomerRef, int, str]] = []

    async def get_service_state(self, customer: CustomerRef) -> ServiceState:
        self.state_lookups += 1
        return await super().get_service_state(customer)

    async def transfer_service_state(
        self, customer: CustomerRef, *, state: int, servicer_userid: str = ""
    ) -> str:
        self.transfers.append((customer, state, servicer_userid))
        return await super().transfer_service_state(customer, state=state, servicer_userid=servicer_userid)


def counting_app(**settings: Any) -> tuple[bootstrap.Application, KfWorld, CountingChannel]:
    world = KfWorld()
    channel = CountingChannel(world)

    def customize(adapters: Any) -> None:
        adapters.world.override(providers.Object(world))
        adapters.channel.override(providers.Object(channel))

    return fake_application(unit_settings(**settings), customize=customize), world, channel


# --- session state ---------------------------------------------------------------------------------------


async def test_a_human_owned_session_is_silent_and_the_message_is_recorded_as_handled() -> None:
    app, world, channel = counting_app()
    customer = CustomerRef(KF, "wmHuman")
    world.add_servicer("zhangsan")
    msgid = world.add_customer_text(KF, "wmHuman", "在吗")
    world.set_service_state(customer, 3, "zhangsan")
    await run(app)
    assert texts(world, "wmHuman") == []
    assert app.adapters.engine().questions == []
    assert channel.state_lookups == 1
    assert await app.adapters.store().state(DedupeKey(KF, msgid)) is MessageState.DONE
    assert app.telemetry().counters["replies_suppressed_human"] == 1


async def test_a_queued_session_is_silent() -> None:
    app, world, _ = counting_app()
    world.add_customer_text(KF, "wmQ", "有人吗")
    world.set_service_state(CustomerRef(KF, "wmQ"), 2)
    await run(app)
    assert texts(world, "wmQ") == []
    assert app.telemetry().counters["replies_suppressed_queued"] == 1


async def test_the_state_is_looked_up_once_per_customer_per_ttl_not_per_message() -> None:
    app, world, channel = counting_app(session_state_ttl_s=60)
    clock = app.adapters.clock()
    for i in range(4):
        world.add_customer_text(KF, "wmMany", f"q{i}")
    await run(app)
    world.add_customer_text(KF, "wmMany", "again")
    await run(app)
    assert texts(world, "wmMany") == ["答：q0", "答：q1", "答：q2", "答：q3", "答：again"]
    assert channel.state_lookups == 1
    clock.advance(61)
    world.add_customer_text(KF, "wmMany", "later")
    await run(app)
    assert channel.state_lookups == 2


async def test_a_failed_lookup_answers_anyway_and_is_not_repeated_per_message() -> None:
    app, world, channel = counting_app()
    world.fail_next("kf/service_state/get", -1)
    world.add_customer_text(KF, "wmLookup", "one")
    world.add_customer_text(KF, "wmLookup", "two")
    await run(app)
    assert texts(world, "wmLookup") == ["答：one", "答：two"]
    assert channel.state_lookups == 1


async def test_95018_means_a_human_owns_it_no_retry_no_error_and_no_further_attempts() -> None:
    app, world, channel = counting_app()
    customer = CustomerRef(KF, "wm95018")
    world.add_customer_text(KF, "wm95018", "first")
    await run(app)
    assert texts(world, "wm95018") == ["答：first"]
    # A servicer takes over without this instance seeing the event.
    world.add_servicer("zhangsan")
    world.set_service_state(customer, 3, "zhangsan")
    world.add_customer_text(KF, "wm95018", "second")
    world.add_customer_text(KF, "wm95018", "third")
    sends_before = len(world.sent)
    await run(app)
    assert len(world.sent) == sends_before
    telemetry = app.telemetry()
    assert telemetry.counters["replies_suppressed_human"] == 2  # one 95018, then silent without trying
    assert not telemetry.labelled.get("wecom_errors")
    assert channel.state_lookups == 1
    assert app.sessions().known(customer).state == 3  # type: ignore[union-attr]


async def test_session_status_change_events_move_the_bot_out_and_back_in() -> None:
    app, world, channel = counting_app()
    customer = CustomerRef(KF, "wmEv")
    world.add_servicer("zhangsan")
    world.add_customer_text(KF, "wmEv", "hello")
    await run(app)
    world.add_event(
        KF, "session_status_change", external_userid="wmEv", change_type=1, new_servicer_userid="zhangsan"
    )
    world.add_customer_text(KF, "wmEv", "to the human")
    await run(app)
    assert texts(world, "wmEv") == ["答：hello"]
    assert app.sessions().known(customer).servicer_userid == "zhangsan"  # type: ignore[union-attr]
    world.add_event(
        KF, "session_status_change", external_userid="wmEv", change_type=3, old_servicer_userid="zhangsan"
    )
    await run(app)
    world.add_customer_text(KF, "wmEv", "bot again")
    await run(app)
    assert texts(world, "wmEv") == ["答：hello", "答：bot again"]
    assert channel.state_lookups == 1  # everything else came from events and replies


async def test_a_servicer_message_silences_the_bot() -> None:
    app, world, channel = counting_app()
    world.add_customer_text(KF, "wmSv", "hello")
    await run(app)
    world.add_servicer_text(KF, "wmSv", "lisi", "您好，我是人工客服")
    world.add_customer_text(KF, "wmSv", "谢谢")
    await run(app)
    assert texts(world, "wmSv") == ["答：hello"]
    assert channel.state_lookups == 1


# --- handoff ---------------------------------------------------------------------------------------------


async def test_a_handoff_keyword_queues_the_session_and_notifies_with_the_msg_code() -> None:
    app, world, channel = counting_app()
    customer = CustomerRef(KF, "wmHand")
    world.add_customer_text(KF, "wmHand", "转人工")
    world.add_customer_text(KF, "wmHand", "还在吗")
    await run(app)
    assert app.adapters.engine().questions == []
    assert channel.transfers == [(customer, 2, "")]
    assert world.get_state(customer).state == 2
    (notice,) = world.sent_on_event
    assert notice.customer == customer and notice.text == BotOptions().texts.handoff
    assert world.sent == []  # nothing through send_msg: the queue message was silent too
    assert app.telemetry().labelled["handoffs"]["keyword"] == 1


async def test_a_configured_servicer_gets_the_session() -> None:
    app, world, channel = counting_app(servicer_userid="zhangsan", texts={"handoff": "已为您转接张三"})
    world.add_servicer("zhangsan")
    world.add_customer_text(KF, "wmSvc", "人工客服")
    await run(app)
    customer = CustomerRef(KF, "wmSvc")
    assert world.get_state(customer).state == 3 and world.get_state(customer).servicer_userid == "zhangsan"
    assert [s.text for s in world.sent_on_event] == ["已为您转接张三"]


@pytest.mark.parametrize(
    ("servicer", "setup", "errcode"),
    [
        ("nobody", None, "95014"),  # not a servicer
        ("lisi", "stopped", "95019"),  # stopped receiving
        ("", "refuse", "95016"),  # transition not allowed
    ],
)
async def test_a_refused_handoff_gets_the_polite_text_and_a_warning(
    servicer: str, setup: str | None, errcode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kfdify")
    app, world, _ = counting_app(servicer_userid=servicer)
    if setup == "stopped":
        world.add_servicer("lisi", status=SERVICER_STOPPED)
    if setup == "refuse":
        world.fail_next("kf/service_state/trans", 95016)
    world.add_customer_text(KF, "wmNo", "转人工")
    world.add_customer_text(KF, "wmNo", "好吧，那我问别的")
    await run(app)
    assert texts(world, "wmNo") == [BotOptions().texts.handoff_failed, "答：好吧，那我问别的"]
    assert app.telemetry().labelled["handoff_failures"][errcode] == 1
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "handoff refused" in r.getMessage()
    ]
    assert len(warnings) == 1 and f"errcode={errcode}" in warnings[0].getMessage()


async def test_a_marker_in_the_answer_hands_off_after_sending_the_rest() -> None:
    app, world, channel = counting_app()
    engine: FakeChatEngine = app.adapters.engine()
    engine.responder = lambda q, h: "这个问题需要人工处理，马上为您转接。\n\n[[转人工]]"
    world.add_customer_text(KF, "wmMark", "我要投诉")
    await run(app)
    assert texts(world, "wmMark") == ["这个问题需要人工处理，马上为您转接。"]
    assert [s.text for s in world.sent_on_event] == [BotOptions().texts.handoff]
    assert channel.transfers == [(CustomerRef(KF, "wmMark"), 2, "")]
    assert app.telemetry().labelled["handoffs"]["marker"] == 1


async def test_no_handoff_when_a_human_took_the_session_while_dify_thought() -> None:
    app, world, channel = counting_app()
    customer = CustomerRef(KF, "wmRace")

    def responder(question: object, history: object) -> str:
        world.add_servicer("zhangsan")
        world.set_service_state(customer, 3, "zhangsan")
        return "好的[[转人工]]"

    app.adapters.engine().responder = responder
    world.add_customer_text(KF, "wmRace", "人呢？")
    await run(app)
    assert world.sent == [] and world.sent_on_event == []
    assert channel.transfers == []
    assert app.sessions().known(customer).state == 3  # type: ignore[union-attr]


async def test_a_marker_only_answer_just_hands_off() -> None:
    app, world, _ = counting_app()
    app.adapters.engine().responder = lambda q, h: "[HANDOFF]"
    world.add_customer_text(KF, "wmOnly", "?")
    await run(app)
    assert texts(world, "wmOnly") == []
    assert len(world.sent_on_event) == 1


async def test_a_long_answer_with_a_marker_keeps_room_for_the_refusal_text() -> None:
    app, world, _ = counting_app(servicer_userid="ghost")
    app.adapters.engine().responder = lambda q, h: "\n\n".join(["很长的段落。" * 300] * 8) + "[[转人工]]"
    world.add_customer_text(KF, "wmLong", "?")
    await run(app)
    replies = texts(world, "wmLong")
    assert len(replies) == 5
    assert replies[-1] == BotOptions().texts.handoff_failed
    assert all("转人工]]" not in r for r in replies)


async def test_without_a_msg_code_the_notice_is_tried_by_send_msg_and_95018_is_fine() -> None:
    class NoCode(CountingChannel):
        async def transfer_service_state(
            self, customer: CustomerRef, *, state: int, servicer_userid: str = ""
        ) -> str:
            await super().transfer_service_state(customer, state=state, servicer_userid=servicer_userid)
            return ""

    world = KfWorld()
    channel = NoCode(world)

    def customize(adapters: Any) -> None:
        adapters.world.override(providers.Object(world))
        adapters.channel.override(providers.Object(channel))

    app = fake_application(customize=customize)
    world.add_customer_text(KF, "wmNoCode", "转人工")
    await run(app)
    assert world.sent == [] and world.sent_on_event == []
    assert not app.telemetry().labelled.get("wecom_errors")
    assert world.get_state(CustomerRef(KF, "wmNoCode")).state == 2


# --- welcome ---------------------------------------------------------------------------------------------


class ParametersEngine(FakeChatEngine):
    def __init__(self, parameters: AppParameters, *, delay: float = 0.0) -> None:
        super().__init__(app_parameters=parameters)
        self.parameter_calls = 0
        self.parameters_delay = delay

    async def parameters(self) -> AppParameters:
        self.parameter_calls += 1
        await asyncio.sleep(self.parameters_delay)
        return await super().parameters()


def app_with_engine(engine: FakeChatEngine, **settings: Any) -> bootstrap.Application:
    def customize(adapters: Any) -> None:
        adapters.engine.override(providers.Object(engine))

    return fake_application(unit_settings(**settings), customize=customize)


async def test_the_configured_welcome_text_is_sent_with_the_welcome_code() -> None:
    app = app_with_engine(
        ParametersEngine(AppParameters(opening_statement="不会用到")), texts={"welcome": "欢迎光临！"}
    )
    world = app.adapters.world()
    _, code = world.add_enter_session(KF, "wmWel")
    await run(app)
    (welcome,) = world.sent_on_event
    assert (welcome.code, welcome.text, welcome.menu) == (code, "欢迎光临！", ())
    assert app.adapters.engine().parameter_calls == 0


async def test_the_opening_statement_and_suggested_questions_make_a_menu_fetched_once() -> None:
    engine = ParametersEngine(
        AppParameters(
            opening_statement="你好，我是**小助手**", suggested_questions=("怎么退货？", "运费多少？")
        )
    )
    app = app_with_engine(engine)
    app.adapters.renderer.override(providers.Object(lambda text: text.replace("**", "")))
    world = app.adapters.world()
    world.add_enter_session(KF, "wmMenu1")
    world.add_enter_session(KF, "wmMenu2")
    await run(app)
    assert [(w.text, w.menu) for w in world.sent_on_event] == [
        ("你好，我是小助手", (("q1", "怎么退货？"), ("q2", "运费多少？")))
    ] * 2
    assert engine.parameter_calls == 1


async def test_no_text_and_no_opening_statement_sends_nothing() -> None:
    app = app_with_engine(ParametersEngine(AppParameters(opening_statement="", suggested_questions=("a",))))
    world = app.adapters.world()
    world.add_enter_session(KF, "wmNothing")
    await run(app)
    assert world.sent_on_event == []
    assert app.telemetry().labelled["welcomes_skipped"]["nothing_to_say"] == 1


async def test_a_stale_enter_session_gets_no_welcome() -> None:
    app = app_with_engine(FakeChatEngine(), texts={"welcome": "欢迎"})
    world = app.adapters.world()
    world.add_enter_session(KF, "wmStale", send_time=int(time.time()) - 25)
    await run(app)
    assert world.sent_on_event == []
    assert app.telemetry().labelled["welcomes_skipped"]["stale"] == 1


async def test_an_enter_session_without_welcome_code_gets_nothing() -> None:
    app = app_with_engine(FakeChatEngine(), texts={"welcome": "欢迎"})
    world = app.adapters.world()
    world.add_enter_session(KF, "wmNoCode", welcome=False)
    await run(app)
    assert world.sent_on_event == []


async def test_a_slow_dify_does_not_hold_up_the_pull_and_the_welcome_gives_up_in_time() -> None:
    engine = ParametersEngine(AppParameters(opening_statement="你好"), delay=0.5)
    app = app_with_engine(engine)
    with_options(app, welcome_deadline_s=0.1)
    world = app.adapters.world()
    world.add_enter_session(KF, "wmSlowWel")
    world.add_customer_text(KF, "wmOther", "先回答我")
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)
    assert texts(world, "wmOther") == ["答：先回答我"]  # answered while the welcome still waits for Dify
    await asyncio.wait_for(app.observer().idle(), 10)
    assert world.sent_on_event == []
    assert app.telemetry().labelled["welcomes_skipped"]["timeout"] == 1


class StuckParametersEngine(FakeChatEngine):
    """Dify never answers the parameters request: only a cancellation ends it."""

    def __init__(self, parameters: AppParameters) -> None:
        super().__init__(app_parameters=parameters)
        self.asked = asyncio.Event()
        self.cancelled = False

    async def parameters(self) -> AppParameters:
        self.asked.set()
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


async def test_shutdown_does_not_wait_for_a_welcome_stuck_on_dify() -> None:
    engine = StuckParametersEngine(AppParameters(opening_statement="你好"))
    app = app_with_engine(engine)
    app.observer.override(
        providers.Singleton(
            SessionEvents,
            sessions=app.sessions,
            welcome=app.welcome,
            rejections=app.rejections,
            telemetry=app.telemetry,
            close_grace_s=0.05,
        )
    )
    world = app.adapters.world()
    world.add_enter_session(KF, "wmBye")
    await app.lifecycle().start()
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)
    await asyncio.wait_for(engine.asked.wait(), 30)  # the welcome now waits for Dify, which never answers
    # Stop returns although Dify never will (the bound only guards against a hang): the stuck welcome was
    # cancelled, not awaited, and nothing was sent for it.
    await asyncio.wait_for(app.lifecycle().stop(), 30)
    assert engine.cancelled
    assert world.sent_on_event == []
    await asyncio.wait_for(app.observer().idle(), 1)


async def test_a_welcome_per_kf_account() -> None:
    other = "wkOther"
    app = fake_application(unit_settings(texts={"welcome": "默认欢迎"}))
    base = app.routing()
    routing = Routing(
        default=base.default,
        routes={
            other: KfRoute(
                other, base.default.engine, dataclasses.replace(base.default.texts, welcome="另一个号的欢迎")
            )
        },
    )
    app.routing.override(providers.Object(routing))
    world = app.adapters.world()
    world.add_enter_session(KF, "wmA")
    world.add_enter_session(other, "wmB")
    await run(app, kf=KF)
    await run(app, kf=other)
    assert {(w.customer.open_kfid, w.text) for w in world.sent_on_event} == {
        (KF, "默认欢迎"),
        (other, "另一个号的欢迎"),
    }


async def test_a_clicked_menu_item_is_answered_like_any_text() -> None:
    app = fake_application()
    world = app.adapters.world()
    world.add_customer_text(KF, "wmClick", "怎么退货？", menu_id="q1")
    await run(app)
    assert texts(world, "wmClick") == ["答：怎么退货？"]


# --- fair use --------------------------------------------------------------------------------------------


async def test_over_the_rate_limit_one_notice_and_no_dify_calls() -> None:
    app = fake_application(unit_settings(rate_limit=2, rate_limit_window_s=60))
    world = app.adapters.world()
    msgids = [world.add_customer_text(KF, "wmSpam", f"q{i}") for i in range(6)]
    await run(app)
    assert texts(world, "wmSpam") == ["答：q0", "答：q1", BotOptions().texts.rate_limited]
    assert len(app.adapters.engine().questions) == 2
    store = app.adapters.store()
    for msgid in msgids:
        assert await store.state(DedupeKey(KF, msgid)) is MessageState.DONE
    assert app.telemetry().labelled["rate_limited"] == {"notify": 1, "drop": 3}
    app.adapters.clock().advance(61)
    world.add_customer_text(KF, "wmSpam", "later")
    await run(app)
    assert texts(world, "wmSpam")[-1] == "答：later"


async def test_the_rate_limit_is_per_customer_and_commands_are_always_honoured() -> None:
    app = fake_application(unit_settings(rate_limit=1, rate_limit_window_s=60))
    world = app.adapters.world()
    world.add_customer_text(KF, "wmR1", "a")
    world.add_customer_text(KF, "wmR1", "b")
    world.add_customer_text(KF, "wmR1", "重置")
    world.add_customer_text(KF, "wmR2", "c")
    await run(app)
    assert texts(world, "wmR1") == ["答：a", BotOptions().texts.rate_limited, BotOptions().texts.reset_done]
    assert texts(world, "wmR2") == ["答：c"]


async def test_a_rate_limit_of_zero_is_off() -> None:
    app = fake_application(unit_settings(rate_limit=0))
    world = app.adapters.world()
    for i in range(30):
        world.add_customer_text(KF, "wmFree", f"q{i}")
    await run(app)
    assert len(app.adapters.engine().questions) == 30
    assert "rate_limited" not in app.telemetry().labelled


# --- send failures ---------------------------------------------------------------------------------------


async def test_msg_send_fail_is_logged_with_its_meaning_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kfdify")
    app = fake_application()
    world = app.adapters.world()
    world.add_event(KF, "msg_send_fail", external_userid="wmF", fail_msgid="abc", fail_type=6)
    world.add_event(KF, "msg_send_fail", external_userid="wmF", fail_msgid="def", fail_type=42)
    await run(app)
    assert app.telemetry().labelled["send_failures"] == {"6": 1, "42": 1}
    lines = [r.getMessage() for r in caplog.records if "could not deliver" in r.getMessage()]
    assert any("fail_type=6" in line and "5-messages" in line for line in lines)
    assert any("fail_type=42" in line and "undocumented" in line for line in lines)


async def test_a_customer_who_rejects_gets_no_welcome_no_interim_no_retries_until_they_write() -> None:
    app = fake_application(unit_settings(interim_after_s=0.05, texts={"welcome": "欢迎"}))
    engine: FakeChatEngine = app.adapters.engine()
    engine.delay = 0.3
    world = app.adapters.world()
    now = int(time.time())
    old_question = world.add_customer_text(KF, "wmRej", "refused before", send_time=now - 5)
    world.add_event(KF, "msg_send_fail", external_userid="wmRej", fail_type=10, send_time=now - 2)
    world.add_enter_session(KF, "wmRej")
    world.fail_next("kf/send_msg", -1)  # transient: a customer who rejects is not retried
    await run(app)
    assert world.sent_on_event == []  # no welcome
    assert texts(world, "wmRej") == []  # no interim, and the failed answer was not retried
    assert await app.adapters.store().state(DedupeKey(KF, old_question)) is MessageState.DONE
    assert app.telemetry().labelled["welcomes_skipped"]["rejected"] == 1
    # Their own next message clears it: interim and answer as usual.
    world.add_customer_text(KF, "wmRej", "hello again", send_time=now + 1)
    await run(app)
    assert texts(world, "wmRej") == ["正在为您查询，请稍候…", "答：hello again"]


# --- configuration ---------------------------------------------------------------------------------------


def test_the_interim_text_is_on_by_default_after_five_seconds() -> None:
    from adapters.inbound.config_file import Settings

    assert BotOptions().interim_after_s == 5.0
    assert (
        Settings(
            corp_id="", corp_secret="", token="", encoding_aes_key="", dify_api_base="", dify_api_key=""
        ).interim_after_s
        == 5.0
    )
