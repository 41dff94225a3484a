"""The state store over a long life and after an operator's reset: issue #13, points 7 to 9.

7. A long-running single instance keeps its cursor, pull state and DONE marks however much else it stores.
8. `/clear` and a conversation reset never make the service answer (or ask Dify about) a message twice.
9. A cursor WeCom keeps refusing is dropped, so the kf account is answered again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from dependency_injector import providers

from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import KfWorld
from adapters.outbound.fake_wecom.rules import ERR_INVALID_PARAM
from adapters.outbound.memcached_store import MemcachedStateStore
from adapters.outbound.memory_store import MemoryStateStore
from application.ports import MessageState, StateStore
from bootstrap import Application
from domain.conversation import Conversation
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, Origin
from tests.support.containers import FakeAdapters, fake_application
from tests.support.memcached import MemcachedProcess

pytestmark = pytest.mark.anyio
KF = "wkHarden"
PULL_LOGGER = "kfdify.pull"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def message(msgid: str, user: str = "wmA", send_time: int = 1) -> InboundMessage:
    return InboundMessage(msgid, KF, user, send_time, Origin.CUSTOMER, "text", text=msgid)


def texts(world: KfWorld) -> list[str]:
    return [sent.text for sent in world.sent]


def app_with(store: StateStore) -> Application:
    def use(adapters: FakeAdapters) -> None:
        adapters.store.override(providers.Object(store))

    return fake_application(customize=use)


async def run(app: Application) -> None:
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 10)


# --- 7: the in-process store's eviction ------------------------------------------------------------------


class TestInProcessEviction:
    async def test_cursor_pull_state_and_kf_accounts_are_never_evicted(self) -> None:
        store = MemoryStateStore(max_keys=50)
        await store.set_cursor(KF, "cursor-1")
        await store.remember_kf(KF)
        await store.request_pull(KF, "token")
        assert await store.acquire_pull(KF, owner="me", lease_s=3600)
        for i in range(1000):
            await store.put_conversation(CustomerRef(KF, f"wm{i}"), Conversation(f"c{i}", 1.0, 1.0, 1))
            await store.finish(DedupeKey(KF, f"m{i}"))
        assert await store.get_cursor(KF) == "cursor-1"
        assert await store.known_kfs() == [KF]
        assert await store.pull_requests(KF) == (1, "token")
        assert await store.acquire_pull(KF, owner="other", lease_s=3600) is False
        assert await store.renew_pull(KF, owner="me", lease_s=3600) is True

    async def test_the_least_recently_used_conversation_goes_not_a_busy_one(self) -> None:
        store = MemoryStateStore(max_keys=20)
        regular = CustomerRef(KF, "wmRegular")
        await store.put_conversation(regular, Conversation("kept", 1.0, 1.0, 1))
        await store.put_conversation(CustomerRef(KF, "wmOnce"), Conversation("once", 1.0, 1.0, 1))
        for i in range(200):
            await store.put_conversation(CustomerRef(KF, f"wm{i}"), Conversation(f"c{i}", 1.0, 1.0, 1))
            assert await store.get_conversation(regular) == Conversation("kept", 1.0, 1.0, 1)
        assert await store.get_conversation(CustomerRef(KF, "wmOnce")) is None

    async def test_done_marks_outlive_conversations(self) -> None:
        store = MemoryStateStore(max_keys=40)
        marks = [DedupeKey(KF, f"done{i}") for i in range(20)]
        for key in marks:
            await store.finish(key)
        for i in range(300):
            await store.put_conversation(CustomerRef(KF, f"wm{i}"), Conversation(f"c{i}", 1.0, 1.0, 1))
        assert await store.states(marks) == [MessageState.DONE] * len(marks)
        assert await store.get_conversation(CustomerRef(KF, "wm0")) is None

    async def test_pending_messages_outlive_done_marks(self, caplog: pytest.LogCaptureFixture) -> None:
        store = MemoryStateStore(max_keys=40)
        await store.record([message(f"p{i}", user=f"wm{i}") for i in range(20)])
        for i in range(300):
            await store.finish(DedupeKey(KF, f"m{i}"))
        assert len(await store.customers_with_pending(KF)) == 20
        assert await store.state(DedupeKey(KF, "m299")) is MessageState.DONE
        assert await store.state(DedupeKey(KF, "m0")) is MessageState.NEW
        assert "dropped" not in caplog.text

    async def test_memory_stays_bounded(self, caplog: pytest.LogCaptureFixture) -> None:
        store = MemoryStateStore(max_keys=30)
        for i in range(500):
            await store.record([message(f"p{i}", user=f"wm{i}", send_time=i)])
        pending = await store.customers_with_pending(KF)
        assert [c.external_userid for c in pending] == [f"wm{i}" for i in range(470, 500)]
        assert "dropped" in caplog.text  # a lost customer message is an error, never silent
        for i in range(100):
            await store.finish(DedupeKey(KF, f"m{i}"))
        states = await store.states([DedupeKey(KF, f"m{i}") for i in range(100)])
        alive = len(await store.customers_with_pending(KF)) + states.count(MessageState.DONE)
        assert alive <= 30
        assert states[-1] is MessageState.DONE

    async def test_a_long_running_instance_keeps_pulling_from_its_cursor_and_answers_once(self) -> None:
        app = app_with(MemoryStateStore(max_keys=30))
        world: KfWorld = app.adapters.world()
        for round_ in range(3):
            for i in range(25):
                world.add_customer_text(KF, f"wm{i}", f"q{round_}-{i}")
            await run(app)
        assert sorted(texts(world)) == sorted(f"答：q{r}-{i}" for r in range(3) for i in range(25))
        assert world.sync_requests[-1].cursor is not None


# --- 8: /clear and reset ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("memcached", marks=pytest.mark.memcached)])
async def shared_store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """A persistent store (Memcached) has no cold-start guard: only the DONE marks stop a second answer."""
    if request.param == "memory":
        yield MemoryStateStore()
        return
    server: MemcachedProcess = request.getfixturevalue("memcached")
    store = MemcachedStateStore(servers=[server.server], prefix="harden", connect_timeout=2, timeout=2)
    try:
        yield store
    finally:
        await store.aclose()


class TestClearAndReset:
    async def test_after_clear_the_history_pulled_again_is_neither_asked_nor_answered(
        self, shared_store: StateStore
    ) -> None:
        app = app_with(shared_store)
        world: KfWorld = app.adapters.world()
        engine: FakeChatEngine = app.adapters.engine()
        for i in range(3):
            world.add_customer_text(KF, f"wm{i}", f"before {i}")
        await run(app)
        assert len(world.sent) == 3 and len(engine.questions) == 3

        await app.conversation_admin().clear()
        world.add_customer_text(KF, "wm0", "after")
        await run(app)

        assert world.sync_requests[-1].cursor is None  # the cursorless pull returned the whole history
        assert [q.query for q in engine.questions[3:]] == ["after"]
        assert texts(world)[3:] == ["答：after"]
        assert engine.questions[-1].conversation_id is None  # the conversation did start over

    async def test_after_a_reset_the_history_pulled_again_is_neither_asked_nor_answered(
        self, shared_store: StateStore
    ) -> None:
        app = app_with(shared_store)
        world: KfWorld = app.adapters.world()
        engine: FakeChatEngine = app.adapters.engine()
        world.add_customer_text(KF, "wmA", "first")
        world.add_customer_text(KF, "wmB", "other")
        await run(app)
        assert await app.conversation_admin().reset("wmA") == 1

        # WeCom forgets our cursor: the next pulls start over from the history.
        await shared_store.set_cursor(KF, "no-longer-valid")
        world.add_customer_text(KF, "wmA", "second")
        for _ in range(3):
            await run(app)

        assert world.sync_requests[-1].cursor is None
        assert sorted(q.query for q in engine.questions[:2]) == ["first", "other"]
        assert [q.query for q in engine.questions[2:]] == ["second"]
        assert sorted(texts(world)) == ["答：first", "答：other", "答：second"]
        assert engine.questions[-1].conversation_id is None


# --- 9: a cursor WeCom refuses ---------------------------------------------------------------------------


class TestRefusedCursor:
    async def test_a_refused_cursor_is_dropped_after_three_tries_and_the_account_answered_again(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        store = MemoryStateStore()
        app = app_with(store)
        world: KfWorld = app.adapters.world()
        world.add_customer_text(KF, "wmA", "answered before")
        await run(app)
        await store.set_cursor(KF, "refused-cursor")
        world.add_customer_text(KF, "wmA", "waiting")

        caplog.set_level(logging.WARNING, logger=PULL_LOGGER)
        for attempt in range(3):
            assert texts(world) == ["答：answered before"], attempt
            await run(app)

        assert texts(world) == ["答：answered before", "答：waiting"]
        cursors = [request.cursor for request in world.sync_requests[1:]]
        assert cursors == ["refused-cursor"] * 3 + [None]
        warnings = [r for r in caplog.records if r.name == PULL_LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert KF in warnings[0].getMessage() and str(ERR_INVALID_PARAM) in warnings[0].getMessage()

        world.add_customer_text(KF, "wmA", "later")
        await run(app)
        assert texts(world)[-1] == "答：later"
        assert world.sync_requests[-1].cursor not in (None, "refused-cursor")

    async def test_transient_and_configuration_errors_never_drop_the_cursor(self) -> None:
        store = MemoryStateStore()
        app = app_with(store)
        world: KfWorld = app.adapters.world()
        world.add_customer_text(KF, "wmA", "one")
        await run(app)
        cursor = await store.get_cursor(KF)
        assert cursor is not None
        for errcode in (-1, 45009, 40001, 95011, 42001):
            for _ in range(4):
                world.fail_next("kf/sync_msg", errcode)
                app.dispatcher().notify(KF, "tok")
                await asyncio.wait_for(app.dispatcher().idle(), 10)
        world.add_customer_text(KF, "wmA", "two")
        await run(app)
        assert None not in [request.cursor for request in world.sync_requests[1:]]
        assert texts(world) == ["答：one", "答：two"]
