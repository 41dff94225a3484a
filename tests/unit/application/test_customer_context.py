"""Issue #17's use cases over the fakes: the ProfileBook's batching and caching, the inputs an app gets, the
conversation names and the handoff feedback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence

import pytest

from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from adapters.outbound.memory_store import MemoryStateStore
from adapters.outbound.wecom_paths import CUSTOMER_BATCHGET
from application.app_inputs import AppInputs, message_time
from application.app_parameters import AppParametersCache
from application.conversation_names import ConversationNamer, conversation_name
from application.customer_profile import ProfileBook
from application.errors import ChatEngineError
from application.handoff_feedback import HandoffFeedback
from application.options import ReplyTexts
from application.routing import KfRoute, Routing
from application.telemetry import Telemetry
from domain.app_form import FormField, fill_inputs, parse_input_form, unfillable_required
from domain.chat import Answer, AppParameters, Question
from domain.conversation import Conversation, with_last_answer
from domain.customer import CustomerBatch, CustomerProfile, EntryContext, clean_scene_param
from domain.messages import CustomerRef, InboundMessage, Origin

pytestmark = pytest.mark.anyio

KF = "wkKF1"
T0 = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> float:
        return self.t

    def __call__(self) -> float:
        return self.t


class CountingDirectory:
    """The fake channel's batchget, counting calls and their ids."""

    def __init__(self, channel: FakeKfChannel) -> None:
        self.channel = channel
        self.calls: list[list[str]] = []

    async def get_customers(self, external_userids: Sequence[str], *, with_context: bool) -> CustomerBatch:
        self.calls.append(list(external_userids))
        return await self.channel.get_customers(external_userids, with_context=with_context)


def text(customer: str, words: str = "你好", *, kf: str = KF) -> InboundMessage:
    return InboundMessage(
        msgid=f"m-{customer}-{words}",
        open_kfid=kf,
        external_userid=customer,
        send_time=int(T0),
        origin=Origin.CUSTOMER,
        msgtype="text",
        text=words,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world(clock: Clock) -> KfWorld:
    return KfWorld(clock=clock)


@pytest.fixture
def directory(world: KfWorld) -> CountingDirectory:
    return CountingDirectory(FakeKfChannel(world))


@pytest.fixture
def store(clock: Clock) -> MemoryStateStore:
    return MemoryStateStore(clock=clock)


@pytest.fixture
async def book(
    store: MemoryStateStore, directory: CountingDirectory, clock: Clock
) -> AsyncIterator[ProfileBook]:
    profiles = ProfileBook(
        store=store, directory=directory, telemetry=Telemetry(), clock=clock, batch_window_s=0.01, wait_s=5.0
    )
    yield profiles
    await profiles.aclose()


# --- ProfileBook -----------------------------------------------------------------------------------------


async def test_customers_wanted_together_go_in_one_batchget(
    book: ProfileBook, world: KfWorld, directory: CountingDirectory
) -> None:
    for n in range(3):
        world.add_customer_profile(f"wm{n}", nickname=f"客户{n}")

    found = await asyncio.gather(*(book.lookup(CustomerRef(KF, f"wm{n}")) for n in range(3)))

    assert [p.nickname if p else None for p in found] == ["客户0", "客户1", "客户2"]
    assert [sorted(call) for call in directory.calls] == [["wm0", "wm1", "wm2"]]


async def test_more_than_100_customers_take_several_calls_of_at_most_100(
    book: ProfileBook, world: KfWorld, directory: CountingDirectory
) -> None:
    for n in range(150):
        world.add_customer_profile(f"wm{n:03d}", nickname=f"客户{n}")

    await asyncio.gather(*(book.lookup(CustomerRef(KF, f"wm{n:03d}")) for n in range(150)))

    assert sorted(len(call) for call in directory.calls) == [50, 100]


async def test_a_customer_is_asked_about_at_most_once_a_day(
    book: ProfileBook, world: KfWorld, directory: CountingDirectory, clock: Clock
) -> None:
    world.add_customer_profile("wmA", nickname="张三")
    alice = CustomerRef(KF, "wmA")
    await book.lookup(alice)
    clock.t += 23 * 3600
    world.add_customer_profile("wmA", nickname="张三丰")

    assert (await book.lookup(alice)) == CustomerProfile(nickname="张三", fetched_at=T0)
    assert len(directory.calls) == 1

    clock.t += 3600 + 1  # a day later the profile is gone from the store and fetched afresh
    fresh = await book.lookup(alice)

    assert fresh is not None and fresh.nickname == "张三丰"
    assert len(directory.calls) == 2


async def test_an_unknown_customer_is_remembered_as_fetched(
    book: ProfileBook, directory: CountingDirectory
) -> None:
    nobody = CustomerRef(KF, "wmNobody")

    first = await book.lookup(nobody)
    await book.lookup(nobody)

    assert first == CustomerProfile(fetched_at=T0)
    assert len(directory.calls) == 1


async def test_a_failure_answers_at_once_warns_with_the_errcode_and_rests(
    book: ProfileBook,
    world: KfWorld,
    directory: CountingDirectory,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world.add_customer_profile("wmA", nickname="张三")
    world.forbidden_apis.add(CUSTOMER_BATCHGET)
    alice = CustomerRef(KF, "wmA")

    assert await book.lookup(alice) is None
    assert await book.lookup(alice) is None  # resting: not asked again
    assert len(directory.calls) == 1
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "48002" in warning.getMessage() and "permission" in warning.getMessage()

    world.forbidden_apis.clear()
    clock.t += 601
    assert await book.lookup(alice) is None  # 48002 is the operator's to fix: a longer rest
    clock.t += 3000
    assert (await book.lookup(alice)) == CustomerProfile(nickname="张三", fetched_at=clock.t)


async def test_an_entry_context_is_kept_and_the_newest_wins(book: ProfileBook, world: KfWorld) -> None:
    world.add_customer_profile("wmA", nickname="张三")
    alice = CustomerRef(KF, "wmA")

    await book.note_entry(alice, EntryContext(scene="ad", scene_param="p1", at=T0))
    await book.note_entry(alice, EntryContext(scene="old", at=T0 - 10))
    await book.idle()

    profile = await book.lookup(alice)
    assert profile is not None and profile.nickname == "张三"
    assert profile.entry == EntryContext(scene="ad", scene_param="p1", at=T0)


# --- the inputs ------------------------------------------------------------------------------------------


def test_scene_param_is_decoded_cleaned_and_cut_to_128_bytes() -> None:
    assert clean_scene_param("%E5%95%86%E5%93%81%E9%A1%B5%3Fid%3D42") == "商品页?id=42"
    assert clean_scene_param("a%0Ab%00c") == "abc"
    assert len(clean_scene_param("%E9%A1%B5" * 100).encode()) <= 128


def test_values_respect_the_form() -> None:
    form = (
        FormField("nickname", "text-input", max_length=3),
        FormField("gender", "select", options=("男", "女")),
        FormField("scene", "select", options=("ad",)),
        FormField("open_kfid", "number"),
        FormField("unionid", "file"),
    )
    context = {"nickname": "张三丰丰", "gender": "女", "scene": "product", "open_kfid": "wk", "unionid": "u"}

    assert fill_inputs(form, context=context, static={"lang": "zh"}) == {
        "lang": "zh",
        "nickname": "张三丰",
        "gender": "女",
    }


def test_the_form_is_read_leniently() -> None:
    raw = [
        {"text-input": {"variable": "nickname", "label": "昵称", "required": True, "max_length": 10}},
        {"select": {"variable": "level", "options": ["a", 3, "b"]}},
        {"paragraph": {"label": "no variable"}},
        "not an object",
        {"two": {}, "keys": {}},
    ]

    assert parse_input_form(raw) == (
        FormField("nickname", "text-input", label="昵称", required=True, max_length=10),
        FormField("level", "select", options=("a", "b")),
    )


def test_required_variables_nobody_fills_are_named() -> None:
    form = (
        FormField("nickname", "text-input", required=True),
        FormField("order", "text-input", required=True),
    )

    assert unfillable_required(form, fillable=frozenset({"nickname"}), static={}) == ["order"]
    assert unfillable_required(form, fillable=frozenset({"nickname"}), static={"order": "x"}) == []


async def test_app_inputs_fill_a_required_unknown_with_unknown(book: ProfileBook) -> None:
    engine = FakeChatEngine(
        app_parameters=AppParameters(
            input_form=(
                FormField("nickname", "text-input", required=True),
                FormField("message_time", "text-input"),
                FormField("external_userid", "text-input"),
            )
        )
    )
    route = KfRoute("default", engine, ReplyTexts())
    inputs = AppInputs(parameters=AppParametersCache(ttl_s=60), profiles=book, static={})

    filled = await inputs.for_message(text("wmNobody"), route)

    assert filled == {
        "nickname": "未知",
        "message_time": message_time(int(T0)),
        "external_userid": "wmNobody",
    }
    assert message_time(int(T0)).startswith("2025-06-15T") or "T" in message_time(int(T0))


async def test_app_inputs_report_required_variables_once(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeChatEngine(
        app_parameters=AppParameters(input_form=(FormField("order_no", "text-input", required=True),))
    )
    route = KfRoute("default", engine, ReplyTexts())
    inputs = AppInputs(parameters=AppParametersCache(ttl_s=60), profiles=None, static={})

    await inputs.report(Routing(default=route))
    await inputs.for_message(text("wmA"), route)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "order_no" in warnings[0]
    assert await inputs.unfillable(route) == ["order_no"]


async def test_without_the_apps_parameters_only_dify_inputs_go() -> None:
    engine = FakeChatEngine()
    engine.app_parameters = AppParameters(input_form=(FormField("nickname", "text-input"),))

    async def broken() -> AppParameters:
        raise ChatEngineError("unreachable", "down")

    engine.parameters = broken  # type: ignore[method-assign]
    route = KfRoute("default", engine, ReplyTexts())
    inputs = AppInputs(parameters=AppParametersCache(ttl_s=60), profiles=None, static={"lang": "zh"})

    assert await inputs.for_message(text("wmA"), route) == {"lang": "zh"}


# --- names and feedback ----------------------------------------------------------------------------------


def test_the_name_template() -> None:
    profile = CustomerProfile(nickname="张三", entry=EntryContext(scene="ad"))
    message = text("wmA")

    assert conversation_name("微信客户 {nickname}", message, profile) == "微信客户 张三"
    assert conversation_name("{nickname}/{scene}/{open_kfid}", message, profile) == "张三/ad/wkKF1"
    assert conversation_name("{nickname} {unknown}", message, None) == "wmA {unknown}"
    assert conversation_name("{broken", message, profile) == "{broken"
    assert conversation_name("", message, profile) == ""


async def test_a_failed_rename_is_only_logged() -> None:
    engine = FakeChatEngine()
    answer = await engine.ask(Question(user=f"kf-{KF}-wmA", query="你好"))
    engine.fail_next_media("name_conversation", ChatEngineError("internal_server_error", "boom", status=500))
    telemetry = Telemetry()
    namer = ConversationNamer(profiles=None, telemetry=telemetry)

    namer.started(text("wmA"), KfRoute("default", engine, ReplyTexts()), answer)
    await namer.idle()

    assert engine.conversation_names == {}
    assert telemetry.labelled["dify_errors"] == {"internal_server_error": 1}


async def test_feedback_marks_the_last_answer_once_within_the_window(
    store: MemoryStateStore, clock: Clock
) -> None:
    engine = FakeChatEngine()
    customer = CustomerRef(KF, "wmA")
    answer = await engine.ask(Question(user=customer.dify_user(), query="怎么退货"))
    conversation = with_last_answer(
        Conversation.started(answer.conversation_id, now=T0), message_id=answer.message_id, now=T0
    )
    await store.put_conversation(customer, conversation)
    telemetry = Telemetry()
    feedback = HandoffFeedback(conversations=store, clock=clock, telemetry=telemetry, window_s=600)
    route = KfRoute("default", engine, ReplyTexts())

    clock.t += 599
    feedback.customer_asked_for_human(text("wmA", "转人工"), route)
    await feedback.idle()
    feedback.customer_asked_for_human(text("wmA", "人工"), route)
    await feedback.idle()

    (recorded,) = engine.feedbacks
    assert (recorded.message_id, recorded.rating) == (answer.message_id, "dislike")
    assert "转人工" in recorded.content
    assert telemetry.counters["feedback_recorded"] == 1


async def test_no_feedback_past_the_window(store: MemoryStateStore, clock: Clock) -> None:
    engine = FakeChatEngine()
    customer = CustomerRef(KF, "wmA")
    answer: Answer = await engine.ask(Question(user=customer.dify_user(), query="怎么退货"))
    await store.put_conversation(
        customer,
        dataclasses.replace(
            Conversation.started(answer.conversation_id, now=T0),
            last_message_id=answer.message_id,
            last_answer_at=T0,
        ),
    )
    feedback = HandoffFeedback(conversations=store, clock=clock, telemetry=Telemetry(), window_s=600)

    clock.t += 601
    feedback.customer_asked_for_human(text("wmA", "转人工"), KfRoute("default", engine, ReplyTexts()))
    await feedback.idle()

    assert engine.feedbacks == []


# --- the whole core over the fakes ---------------------------------------------------------------------


async def test_a_customer_from_a_video_channel_reaches_the_app_with_it() -> None:
    from urllib.parse import quote

    from tests.support.containers import fake_application

    app = fake_application()
    world: KfWorld = app.adapters.world()
    engine: FakeChatEngine = app.adapters.engine()
    engine.app_parameters = AppParameters(
        input_form=parse_input_form(
            [
                {"text-input": {"variable": "channels_nickname", "label": "视频号"}},
                {"text-input": {"variable": "nickname", "label": "昵称"}},
                {"text-input": {"variable": "scene_param", "label": "来源"}},
            ]
        )
    )
    world.add_customer_profile("wmV", nickname="阿明")
    world.add_enter_session(
        "wkUnit",
        "wmV",
        scene="channels",
        scene_param=quote("直播间 #3"),
        welcome=False,
        wechat_channels={"nickname": "好物直播", "scene": 2},
    )
    world.add_customer_text("wkUnit", "wmV", "这个多少钱")
    app.dispatcher().notify("wkUnit", "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)
    await app.namer().idle()

    (question,) = engine.questions
    assert dict(question.inputs) == {
        "channels_nickname": "好物直播",
        "nickname": "阿明",
        "scene_param": "直播间 #3",
    }
    profile = await app.profiles().lookup(CustomerRef("wkUnit", "wmV"))
    assert profile is not None and profile.entry is not None and profile.entry.channels_scene == 2
    assert list(engine.conversation_names.values()) == ["微信客户 阿明"]
    await app.profiles().aclose()
