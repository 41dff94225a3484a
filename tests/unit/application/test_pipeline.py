"""The use cases end to end over fake adapters swapped in through the container."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from dependency_injector import providers

from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from adapters.outbound.memory_store import MemoryStateStore
from application.errors import ChatEngineError
from application.ports import MessageState
from domain.chat import Question
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import CustomerRef
from tests.support.containers import FakeAdapters, fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkUnit"


async def run(app, *, kf: str = KF) -> None:  # type: ignore[no-untyped-def]
    app.dispatcher().notify(kf, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)


def texts(world: KfWorld, customer: str) -> list[str]:
    return [s.text for s in world.sent if s.customer.external_userid == customer]


async def test_each_customer_message_is_answered_once_in_order() -> None:
    app = fake_application()
    world = app.adapters.world()
    for i in range(3):
        world.add_customer_text(KF, "wm1", f"q{i}")
    await run(app)
    await run(app)
    assert texts(world, "wm1") == ["答：q0", "答：q1", "答：q2"]
    engine: FakeChatEngine = app.adapters.engine()
    convs = {q.conversation_id for q in engine.questions[1:]}
    assert len(convs) == 1 and None not in convs


async def test_replies_carry_msgids_derived_from_the_customer_message() -> None:
    app = fake_application()
    world = app.adapters.world()
    msgid = world.add_customer_text(KF, "wm1", "hello")
    await run(app)
    assert world.sent[0].msgid == outbound_msgid(DedupeKey(KF, msgid), 0)


async def test_two_instances_sharing_state_answer_each_message_exactly_once_in_order() -> None:
    shared_store = MemoryStateStore()
    shared_world = KfWorld()
    engine = FakeChatEngine(delay=0.02)

    def share(adapters: FakeAdapters) -> None:
        adapters.store.override(providers.Object(shared_store))
        adapters.world.override(providers.Object(shared_world))
        adapters.engine.override(providers.Object(engine))

    a, b = fake_application(customize=share), fake_application(customize=share)
    customers = [f"wm{i}" for i in range(8)]
    for round_ in range(4):
        for c in customers:
            shared_world.add_customer_text(KF, c, f"{c}:{round_}")
        a.dispatcher().notify(KF, "t")
        b.dispatcher().notify(KF, "t")
        await asyncio.sleep(0.005)
        # Both instances drain every customer at once, as after overlapping callbacks and recovery passes.
        for c in customers:
            a.dispatcher().drain(CustomerRef(KF, c))
            b.dispatcher().drain(CustomerRef(KF, c))
    for _ in range(3):  # a straggler may still be draining after the other finished
        await asyncio.wait_for(asyncio.gather(a.dispatcher().idle(), b.dispatcher().idle()), 20)
    for c in customers:
        assert texts(shared_world, c) == [f"答：{c}:{r}" for r in range(4)]
    assert len(engine.questions) == len(customers) * 4


async def test_a_message_left_by_a_dead_instance_is_answered_after_its_lease_expires() -> None:
    app = fake_application(unit_settings())
    store: MemoryStateStore = app.adapters.store()
    world = app.adapters.world()
    msgid = world.add_customer_text(KF, "wmDead", "还在吗")
    # Another instance pulled and recorded it, claimed it, then died.
    page = await app.adapters.channel().sync_messages(KF, cursor=None, token=None)
    await store.record(page.messages)
    await store.set_cursor(KF, page.next_cursor)
    await store.remember_kf(KF)
    key = DedupeKey(KF, msgid)
    assert await store.begin(key, owner="dead-instance", lease_s=0.2)
    await app.dispatcher().recover()
    await asyncio.sleep(0.05)
    assert texts(world, "wmDead") == []
    await asyncio.wait_for(app.dispatcher().idle(), 10)
    assert texts(world, "wmDead") == ["答：还在吗"]
    assert await store.state(key) is MessageState.DONE


async def test_a_human_owned_session_stays_silent_without_errors() -> None:
    app = fake_application()
    world = app.adapters.world()
    customer = CustomerRef(KF, "wmHuman")
    world.add_customer_text(KF, "wmHuman", "人工在吗")
    world.add_servicer("zhangsan")
    world.set_service_state(customer, 3, "zhangsan")
    await run(app)
    assert texts(world, "wmHuman") == []
    telemetry = app.telemetry()
    assert telemetry.counters["replies_suppressed_human"] == 1
    assert not telemetry.labelled.get("wecom_errors")


async def test_transient_send_failure_is_retried_with_the_same_msgid() -> None:
    app = fake_application()
    world = app.adapters.world()
    world.add_customer_text(KF, "wmBusy", "hi")
    world.fail_next("kf/send_msg", -1)
    await run(app)
    assert texts(world, "wmBusy") == ["答：hi"]


async def test_retryable_dify_error_is_retried_once_then_answered() -> None:
    settings = unit_settings()
    app = fake_application(settings)
    app.options.override(providers.Object(dataclasses.replace(app.options(), dify_retry_delay_s=0.01)))
    engine: FakeChatEngine = app.adapters.engine()
    engine.fail_next(ChatEngineError("too_many_requests", "busy", status=429, retryable=True))
    world = app.adapters.world()
    world.add_customer_text(KF, "wmRetry", "hi")
    await run(app)
    assert texts(world, "wmRetry") == ["答：hi"]
    assert app.telemetry().labelled["dify_errors"]["too_many_requests"] == 1


async def test_dify_failure_after_retries_sends_the_configured_fallback() -> None:
    app = fake_application(unit_settings(texts={"fallback": "系统繁忙"}, dify_retries=0))
    engine: FakeChatEngine = app.adapters.engine()
    engine.fail_next(ChatEngineError("internal_server_error", "boom", status=500, retryable=True))
    world = app.adapters.world()
    world.add_customer_text(KF, "wmFb", "hi")
    world.add_customer_text(KF, "wmFb", "again")
    await run(app)
    assert texts(world, "wmFb") == ["系统繁忙", "答：again"]


async def test_interim_text_when_dify_is_slow_counts_against_the_quota() -> None:
    app = fake_application(unit_settings(interim_after_s=0.05))
    engine: FakeChatEngine = app.adapters.engine()
    engine.delay = 0.3
    world = app.adapters.world()
    world.add_customer_text(KF, "wmSlow", "hi")
    await run(app)
    replies = texts(world, "wmSlow")
    assert replies[0] == "正在为您查询，请稍候…" and replies[1] == "答：hi"
    assert world.sent[0].msgid.endswith("_0") and world.sent[1].msgid.endswith("_1")


async def test_conversation_idle_ttl_starts_a_new_conversation() -> None:
    app = fake_application(unit_settings(conversation_idle_ttl_s=60))
    clock = app.adapters.clock()
    world = app.adapters.world()
    engine: FakeChatEngine = app.adapters.engine()
    world.clock = clock.now
    world.add_customer_text(KF, "wmIdle", "one")
    await run(app)
    clock.advance(61)
    world.add_customer_text(KF, "wmIdle", "two")
    await run(app)
    assert [q.conversation_id for q in engine.questions][1] is None


async def test_unexpected_bug_in_answering_neither_kills_the_worker_nor_loops() -> None:
    app = fake_application()
    engine: FakeChatEngine = app.adapters.engine()
    calls = 0

    def responder(question: Question, history: object) -> str:
        nonlocal calls
        calls += 1
        if question.query == "boom":
            raise RuntimeError("bug")
        return "ok"

    engine.responder = responder
    world = app.adapters.world()
    world.add_customer_text(KF, "wmBug", "boom")
    world.add_customer_text(KF, "wmBug", "fine")
    await run(app)
    await run(app)
    assert texts(world, "wmBug")[-1] == "ok"
    assert calls == 2
    assert app.telemetry().counters["internal_errors"] == 1


async def test_messages_older_than_the_limit_are_recorded_not_answered() -> None:
    app = fake_application(unit_settings(max_message_age_s=60))
    world = app.adapters.world()
    msgid = world.add_customer_text(KF, "wmOld", "old", send_time=int(time.time()) - 3600)
    await run(app)
    assert texts(world, "wmOld") == []
    assert await app.adapters.store().state(DedupeKey(KF, msgid)) is MessageState.DONE


async def test_callbacks_during_a_pull_are_coalesced() -> None:
    app = fake_application()
    world = app.adapters.world()
    world.add_customer_text(KF, "wmC", "hi")
    for _ in range(50):
        app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)
    assert len(world.sync_requests) <= 3
    assert texts(world, "wmC") == ["答：hi"]


async def test_shutdown_hands_unfinished_messages_back() -> None:
    app = fake_application(unit_settings(shutdown_grace_s=0.05))
    engine: FakeChatEngine = app.adapters.engine()
    engine.delay = 5
    world = app.adapters.world()
    msgid = world.add_customer_text(KF, "wmStop", "slow")
    await app.lifecycle().start()
    app.dispatcher().notify(KF, "t")
    await asyncio.sleep(0.2)
    await app.lifecycle().stop()
    store: MemoryStateStore = app.adapters.store()
    assert await store.state(DedupeKey(KF, msgid)) is MessageState.NEW
    assert [m.msgid for m in await store.pending(CustomerRef(KF, "wmStop"))] == [msgid]
    assert texts(world, "wmStop") == []


async def test_fake_channel_in_the_container_is_the_fake() -> None:
    app = fake_application()
    assert isinstance(app.adapters.channel(), FakeKfChannel)


async def test_shutdown_lets_replies_in_flight_finish_within_the_grace_period() -> None:
    app = fake_application(unit_settings(shutdown_grace_s=5))
    engine: FakeChatEngine = app.adapters.engine()
    engine.delay = 0.3
    world = app.adapters.world()
    world.add_customer_text(KF, "wmGrace", "slow but in time")
    await app.lifecycle().start()
    app.dispatcher().notify(KF, "t")
    await asyncio.sleep(0.1)
    await app.lifecycle().stop()
    assert texts(world, "wmGrace") == ["答：slow but in time"]
    # Nothing new is taken once stopping began.
    world.add_customer_text(KF, "wmGrace", "too late")
    app.dispatcher().notify(KF, "t")
    await asyncio.sleep(0.05)
    assert texts(world, "wmGrace") == ["答：slow but in time"]


async def test_a_pull_lease_left_behind_by_our_own_failed_release_does_not_block_pulls() -> None:
    app = fake_application()
    store: MemoryStateStore = app.adapters.store()
    # A release that never reached the store (an outage at the wrong moment) leaves our own lease behind.
    assert await store.acquire_pull(KF, owner=app.owner(), lease_s=600)
    world = app.adapters.world()
    world.add_customer_text(KF, "wmLease", "还能回答吗")
    await run(app)
    assert texts(world, "wmLease") == ["答：还能回答吗"]


async def test_pulls_of_one_kf_account_start_at_least_the_pull_interval_apart_across_callbacks() -> None:
    # The first pull finishes long before the second callback: without pacing across pull loops, every
    # callback of a steady stream would start its own sync_msg.
    app = fake_application()
    world = app.adapters.world()
    interval = app.options().pull_interval_s
    assert interval > 0
    started: list[float] = []
    channel = app.adapters.channel()
    sync = channel.sync_messages

    async def timed_sync(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(time.monotonic())
        return await sync(*args, **kwargs)

    channel.sync_messages = timed_sync
    world.add_customer_text(KF, "wm1", "one")
    await run(app)
    world.add_customer_text(KF, "wm1", "two")
    await run(app)
    assert texts(world, "wm1") == ["答：one", "答：two"]
    assert len(started) == 2
    assert started[1] - started[0] >= interval * 0.95
