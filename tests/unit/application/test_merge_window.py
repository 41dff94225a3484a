"""A burst of texts is one question: the merge window over the fake adapters (a controllable clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from dependency_injector import providers

import bootstrap
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import KfWorld
from adapters.outbound.memory_store import MemoryStateStore
from application.merge_window import MergeWindow
from application.options import ReplyTexts
from application.ports import MessageState
from application.telemetry import Telemetry
from domain.chat import AppParameters
from domain.commands import CommandSet
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import CustomerRef, InboundMessage, Origin
from tests.support import media_samples
from tests.support.containers import FakeAdapters, FakeClock, fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkMerge"
WM = "wmBurst"
CUSTOMER = CustomerRef(KF, WM)
TEXTS = ReplyTexts()
IMAGES = {
    "enabled": True,
    "allowed_file_types": ["image"],
    "allowed_file_upload_methods": ["local_file", "remote_url"],
    "number_limits": 3,
}


class Shared:
    """What several instances share: WeCom, Dify, the state store and the time."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.world = KfWorld()
        self.store = MemoryStateStore(clock=self.clock.now)
        self.engine = FakeChatEngine(app_parameters=AppParameters(file_upload=dict(IMAGES)))

    def instance(self, **settings: Any) -> bootstrap.Application:
        def customize(adapters: FakeAdapters) -> None:
            adapters.clock.override(providers.Object(self.clock))
            adapters.world.override(providers.Object(self.world))
            adapters.store.override(providers.Object(self.store))
            adapters.engine.override(providers.Object(self.engine))

        overrides: dict[str, Any] = {"merge_window_s": 3.0, "image_text_window_s": 3.0} | settings
        app = fake_application(unit_settings(**overrides), customize=customize)
        # Started a while ago: the bursts below (up to a minute old) are not history from before the start.
        app.started_at()
        self.clock.advance(120)
        return app

    @property
    def now(self) -> int:
        return int(self.clock.now())

    def text(self, text: str, *, ago: float = 0.0) -> str:
        return self.world.add_customer_text(KF, WM, text, send_time=int(self.clock.now() - ago))

    def image(self, *, ago: float = 0.0) -> str:
        msgid, _ = self.world.add_customer_media(
            KF, WM, "image", media_samples.png(), "image/png", send_time=int(self.clock.now() - ago)
        )
        return msgid

    def questions(self) -> list[str]:
        return [q.query for q in self.engine.questions]

    def texts(self) -> list[str]:
        return [s.text for s in self.world.sent if s.customer == CUSTOMER]

    async def state(self, msgid: str) -> MessageState:
        return await self.store.state(DedupeKey(KF, msgid))


async def run(app: bootstrap.Application) -> None:
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 20)


async def until(condition: Callable[[], Any], timeout: float = 20) -> None:
    """Wait for a condition (sync or async), never for a time."""

    async def check() -> bool:
        result = condition()
        return bool(await result if asyncio.iscoroutine(result) else result)

    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def counters(app: bootstrap.Application) -> Mapping[str, int]:
    return app.telemetry().counters


# --- through the application ---------------------------------------------------------------------------


async def test_without_a_window_every_message_is_answered_on_its_own() -> None:
    s = Shared()
    app = s.instance(merge_window_s=0.0)
    for word in ("你好", "我想退货", "订单号 12345"):
        s.text(word, ago=5)

    await run(app)

    assert s.questions() == ["你好", "我想退货", "订单号 12345"]
    assert counters(app)["merged_messages"] == 0


async def test_a_burst_within_the_window_is_one_question_answered_once() -> None:
    s = Shared()
    app = s.instance()
    ids = [s.text("你好", ago=12), s.text("我想退货", ago=10), s.text("订单号 12345", ago=8)]

    await run(app)

    assert s.questions() == ["你好\n我想退货\n订单号 12345"]
    assert s.texts() == ["答：你好\n我想退货\n订单号 12345"]
    # The answer is the newest message's: its quota, its msgid.
    assert s.world.sent[0].msgid == outbound_msgid(DedupeKey(KF, ids[-1]), 0)
    for msgid in ids:
        assert await s.state(msgid) is MessageState.DONE
    assert await s.store.pending(CUSTOMER) == []
    assert counters(app)["merged_messages"] == 2


async def test_texts_further_apart_than_the_window_are_separate_questions() -> None:
    s = Shared()
    app = s.instance()
    s.text("第一个问题", ago=30)
    s.text("第一个问题的补充", ago=28)
    s.text("另一个问题", ago=20)

    await run(app)

    assert s.questions() == ["第一个问题\n第一个问题的补充", "另一个问题"]


async def test_a_reset_in_the_middle_acts_alone_after_the_texts_before_it() -> None:
    s = Shared()
    app = s.instance()
    s.text("你好", ago=6)
    s.text("在吗", ago=5)
    s.text("重置", ago=5)
    s.text("我想退货", ago=4)
    s.text("订单号 12345", ago=4)

    await run(app)

    assert s.questions() == ["你好\n在吗", "我想退货\n订单号 12345"]
    assert s.texts() == ["答：你好\n在吗", TEXTS.reset_done, "答：我想退货\n订单号 12345"]


async def test_a_handoff_word_is_never_merged() -> None:
    s = Shared()
    app = s.instance()
    s.text("退款怎么还没到", ago=6)
    handoff = s.text("转人工", ago=5)
    s.text("快点", ago=5)

    await run(app)

    assert s.questions() == ["退款怎么还没到"]  # after the handoff the human owns the session
    assert await s.state(handoff) is MessageState.DONE
    assert counters(app)["merged_messages"] == 0


async def test_an_image_keeps_its_pairing_and_the_texts_after_it_merge() -> None:
    s = Shared()
    app = s.instance()
    s.text("你好", ago=20)
    image = s.image(ago=6)
    first = s.text("这个零件", ago=5)
    last = s.text("叫什么？", ago=4)

    await run(app)

    assert [(q.query, len(q.files)) for q in s.engine.questions] == [("你好", 0), ("这个零件\n叫什么？", 1)]
    for msgid in (image, first, last):
        assert await s.state(msgid) is MessageState.DONE
    assert counters(app)["image_text_pairs"] == 1 and counters(app)["merged_messages"] == 1


async def test_an_image_ends_a_burst_of_texts() -> None:
    s = Shared()
    app = s.instance(image_text_window_s=0.0)
    s.text("看一下", ago=6)
    s.image(ago=5)
    s.text("这个", ago=5)

    await run(app)

    assert [(q.query, len(q.files)) for q in s.engine.questions] == [
        ("看一下", 0),
        (TEXTS.image_query, 1),
        ("这个", 0),
    ]


async def test_the_drain_waits_for_the_next_text_until_the_window_passes() -> None:
    s = Shared()
    app = s.instance()
    first = s.text("你好")
    app.dispatcher().notify(KF, "tok")
    await until(lambda: _is(s.state(first), MessageState.BUSY))

    s.clock.advance(2)  # the next text comes 2 s later: inside the window, so the drain is still waiting
    second = s.text("我想退货")
    app.dispatcher().notify(KF, "tok")
    await until(lambda: _is(s.state(second), MessageState.BUSY))
    assert s.questions() == []

    s.clock.advance(3)  # the window after the last text passes: asked at once
    await asyncio.wait_for(app.dispatcher().idle(), 20)

    assert s.questions() == ["你好\n我想退货"]
    assert await s.state(first) is MessageState.DONE and await s.state(second) is MessageState.DONE


async def test_a_text_that_arrives_while_the_question_is_gathered_joins_it() -> None:
    s = Shared()
    app = s.instance()
    first = s.text("你好", ago=60)  # answered late (a backlog): the window after it has long passed
    second = s.text("在吗")  # sent while the bot turns to the first: it arrived while preparing
    app.dispatcher().notify(KF, "tok")
    await until(lambda: _is(s.state(second), MessageState.BUSY))

    s.clock.advance(3)  # and the window after the second passes
    await asyncio.wait_for(app.dispatcher().idle(), 20)

    assert s.questions() == ["你好\n在吗"]
    assert await s.state(first) is MessageState.DONE and await s.state(second) is MessageState.DONE


async def test_two_instances_answer_the_same_burst_once() -> None:
    s = Shared()
    a, b = s.instance(), s.instance()
    assert a.owner() != b.owner()
    ids = [s.text("你好", ago=9), s.text("我想退货", ago=8), s.text("订单号 12345", ago=7)]

    a.dispatcher().notify(KF, "tok")
    b.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(asyncio.gather(a.dispatcher().idle(), b.dispatcher().idle()), 20)

    assert s.questions() == ["你好\n我想退货\n订单号 12345"]
    assert s.texts() == ["答：你好\n我想退货\n订单号 12345"]
    for msgid in ids:
        assert await s.state(msgid) is MessageState.DONE
    assert counters(a)["merged_messages"] + counters(b)["merged_messages"] == 2


async def test_a_burst_left_by_a_dead_instance_is_merged_again_once_its_claims_expire() -> None:
    s = Shared()
    app = s.instance(message_lease_s=30.0)
    ids = [s.text("还有一个问题", ago=3), s.text("发票怎么开", ago=2)]
    # An instance recorded and claimed both texts for one question, then died before answering.
    dead = [
        inbound(msgid, text, s.now - ago)
        for msgid, text, ago in zip(ids, ("还有一个问题", "发票怎么开"), (3, 2), strict=True)
    ]
    await s.store.record(dead)
    for message in dead:
        assert await s.store.claim(message, owner="dead-instance", lease_s=30.0)

    app.dispatcher().notify(KF, "tok")
    await until(lambda: counters(app)["messages_pulled"] >= 2)
    assert s.questions() == []  # held by the dead instance: the drain waits, in order

    s.clock.advance(31)  # the dead instance's claims expire
    await asyncio.wait_for(app.dispatcher().idle(), 20)

    assert s.questions() == ["还有一个问题\n发票怎么开"]
    assert s.texts() == ["答：还有一个问题\n发票怎么开"]
    for msgid in ids:
        assert await s.state(msgid) is MessageState.DONE

    await run(app)  # another callback answers nothing again
    assert s.questions() == ["还有一个问题\n发票怎么开"]


async def _is(state: Any, expected: MessageState) -> bool:
    return await state is expected


async def _pending_ids(s: Shared, ids: list[str]) -> bool:
    return [m.msgid for m in await s.store.pending(CUSTOMER)] == ids


# --- the merge itself, over the in-process store ------------------------------------------------------


def inbound(msgid: str, text: str, send_time: int, msgtype: str = "text") -> InboundMessage:
    return InboundMessage(
        msgid=msgid,
        open_kfid=KF,
        external_userid=WM,
        send_time=send_time,
        origin=Origin.CUSTOMER,
        msgtype=msgtype,
        text=text,
    )


def merger(store: MemoryStateStore, clock: FakeClock, owner: str = "me") -> MergeWindow:
    return MergeWindow(
        store=store,
        clock=clock,
        telemetry=Telemetry(),
        commands=CommandSet.of(handoff=("转人工",)),
        owner=owner,
        window_s=3.0,
        lease_s=30.0,
    )


async def test_a_text_another_instance_holds_ends_the_burst() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStateStore(clock=clock.now)
    burst = [inbound("m1", "a", 999_990), inbound("m2", "b", 999_991), inbound("m3", "c", 999_992)]
    await store.record(burst)
    assert await store.claim(burst[0], owner="me", lease_s=30)
    assert await store.claim(burst[1], owner="other", lease_s=30)
    claimed = [(burst[0], DedupeKey.for_message(burst[0]))]

    question = await merger(store, clock).gather(burst[0], claimed)

    assert (question.msgid, question.text) == ("m1", "a")
    assert [m.msgid for m, _ in claimed] == ["m1"]


async def test_the_merged_question_is_the_last_message_with_every_text() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStateStore(clock=clock.now)
    burst = [inbound("m1", "a", 999_990), inbound("m2", "b", 999_991), inbound("m3", "转人工", 999_992)]
    await store.record(burst)
    assert await store.claim(burst[0], owner="me", lease_s=30)
    claimed = [(burst[0], DedupeKey.for_message(burst[0]))]

    question = await merger(store, clock).gather(burst[0], claimed)

    assert (question.msgid, question.text, question.send_time) == ("m2", "a\nb", 999_991)
    assert [m.msgid for m, _ in claimed] == ["m1", "m2"]
    assert await store.state(DedupeKey(KF, "m3")) is MessageState.NEW


class FailingInbox(MemoryStateStore):
    """The in-process store, but reading the inbox fails (as Memcached going away would)."""

    async def pending(self, customer: CustomerRef) -> list[InboundMessage]:
        raise ConnectionError("store unreachable")


async def test_when_the_store_fails_while_merging_the_first_text_is_still_asked() -> None:
    clock = FakeClock(1_000_000.0)
    store = FailingInbox(clock=clock.now)
    first = inbound("m1", "a", 999_999)
    await store.record([first, inbound("m2", "b", 999_999)])
    assert await store.claim(first, owner="me", lease_s=30)
    claimed = [(first, DedupeKey.for_message(first))]

    question = await merger(store, clock).gather(first, claimed)

    assert (question.msgid, question.text) == ("m1", "a")
    assert [m.msgid for m, _ in claimed] == ["m1"]
