"""Two application instances over one shared store object act as one bot: a burst is split between them,
every message is answered exactly once and in order, and a customer's rate limit is the limit, not twice it.

Each instance has its own engine, clock, telemetry and dispatcher; they share the WeCom fake (one kf
account, one callback URL) and the in-process store object (standing in for Memcached).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import pytest

import bootstrap
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import KfWorld
from adapters.outbound.memory_store import MemoryStateStore
from application.ports import AnswerProgress
from application.work_sharing import FAIR_SHARE_FLOOR
from domain.chat import Answer, Question
from domain.messages import CustomerRef
from domain.session import SessionState
from tests.support.containers import FakeAdapters, fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkTwoInstances"


class GatedEngine(FakeChatEngine):
    """The fake engine, holding every question until the gate opens; counts those waiting. Both instances'
    engines are one Dify app: they share its conversations."""

    def __init__(self, gate: asyncio.Event, app: FakeChatEngine) -> None:
        super().__init__()
        self.conversations = app.conversations
        self.gate = gate
        self.waiting = 0
        self.held: list[str] = []  # the customers asked, in the order they reached the gate

    async def ask(self, question: Question, progress: AnswerProgress | None = None) -> Answer:
        self.held.append(question.user)
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().ask(question, progress)


def instance(
    store: MemoryStateStore, world: KfWorld, engine: FakeChatEngine, *, max_drains: int, **settings: Any
) -> bootstrap.Application:
    def share(adapters: FakeAdapters) -> None:
        adapters.store.override(store)
        adapters.world.override(world)
        adapters.engine.override(engine)

    app = fake_application(unit_settings(**settings), customize=share)
    app.dispatcher.add_kwargs(max_drains=max_drains)
    # The in-process store object stands in for Memcached: share the rate limit and notes through it.
    app.rate_limiter.add_kwargs(counters=store, notes=store)
    app.sessions.add_kwargs(notes=store)
    app.rejections.add_kwargs(notes=store)
    return app


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_burst_is_split_answered_exactly_once_and_in_order() -> None:
    store, world, gate = MemoryStateStore(), KfWorld(), asyncio.Event()
    dify = FakeChatEngine()
    engines = (GatedEngine(gate, dify), GatedEngine(gate, dify))
    apps = [instance(store, world, engine, max_drains=3, rate_limit=0) for engine in engines]
    dispatchers = [app.dispatcher() for app in apps]
    customers, turns = 30, 3
    for turn in range(turns):
        for c in range(customers):
            world.add_customer_text(KF, f"wm{c:02d}", f"q{turn}")
    # Callbacks spread over both instances: the first pulls, the second arrives while it pulls.
    dispatchers[0].notify(KF, "t")
    dispatchers[1].notify(KF, "t")
    # Neither takes more than its room: each holds 3 questions, the other 24 customers wait in the inbox.
    await until(lambda: all(engine.waiting == 3 for engine in engines))
    assert [d.draining for d in dispatchers] == [3, 3]
    assert len(await store.customers_with_pending(KF)) == customers

    gate.set()
    await until(lambda: len(world.sent) >= customers * turns)
    for dispatcher in dispatchers:
        await dispatcher.idle()

    replies = Counter((s.customer.external_userid, s.text) for s in world.sent)
    assert len(world.sent) == customers * turns
    assert set(replies.values()) == {1}  # exactly once
    for c in range(customers):
        texts = [s.text for s in world.sent if s.customer.external_userid == f"wm{c:02d}"]
        assert texts == [f"答：q{turn}" for turn in range(turns)]  # in the order sent
    asked = [len(engine.questions) for engine in engines]
    assert sum(asked) == customers * turns
    assert all(0.25 <= n / sum(asked) <= 0.75 for n in asked), asked
    assert not await store.customers_with_pending(KF)


class Room:
    """The answering side's room as the Dify limiter reports it: a current limit that may grow."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def has_room(self) -> bool:
        return True  # nobody waits for a slot: only the limit holds the instances back

    def room(self) -> int:
        return self.limit


async def test_a_burst_offered_in_one_go_is_taken_only_up_to_the_limit_then_as_it_grows() -> None:
    """A pulled page offers all its customers before any has asked Dify: the puller must count the drains it
    starts against its limit, not the calls in flight (still none), or it takes the whole burst."""
    store, world, gate = MemoryStateStore(), KfWorld(), asyncio.Event()
    dify = FakeChatEngine()
    engines = (GatedEngine(gate, dify), GatedEngine(gate, dify))
    rooms = (Room(5), Room(5))
    apps = [instance(store, world, engine, max_drains=0, rate_limit=0) for engine in engines]
    for app, room in zip(apps, rooms, strict=True):
        app.dispatcher.add_kwargs(capacity=room)
    dispatchers = [app.dispatcher() for app in apps]
    customers = 40
    for c in range(customers):
        world.add_customer_text(KF, f"wm{c:02d}", "q")
    dispatchers[0].notify(KF, "t")
    dispatchers[1].notify(KF, "t")
    await until(lambda: all(engine.waiting == 5 for engine in engines))
    assert [d.draining for d in dispatchers] == [5, 5]
    # The limit grows (as slow start doubles it): each takes more at its next look, none beyond its room.
    for room in rooms:
        room.limit = 15
    await until(lambda: all(engine.waiting == 15 for engine in engines))
    assert [d.draining for d in dispatchers] == [15, 15]

    gate.set()
    await until(lambda: len(world.sent) >= customers)
    for dispatcher in dispatchers:
        await dispatcher.idle()
    assert sorted(s.customer.external_userid for s in world.sent) == [f"wm{c:02d}" for c in range(customers)]
    asked = [len(engine.questions) for engine in engines]
    assert all(0.25 <= n / customers <= 0.75 for n in asked), asked


async def test_the_rate_limit_is_shared_one_limit_one_notice() -> None:
    store, world, gate = MemoryStateStore(), KfWorld(), asyncio.Event()
    gate.set()
    dify = FakeChatEngine()
    engines = (GatedEngine(gate, dify), GatedEngine(gate, dify))
    apps = [
        instance(store, world, engine, max_drains=2, rate_limit=4, rate_limit_window_s=3600)
        for engine in engines
    ]
    dispatchers = [app.dispatcher() for app in apps]
    # One customer writes 7 times, one message after the other; each callback lands on the other instance,
    # which pulls the message and answers it itself.
    for n in range(7):
        world.add_customer_text(KF, "wmBusy", f"m{n}")
        dispatchers[n % 2].notify(KF, "t")
        await until(lambda: not any(d.busy for d in dispatchers))

    texts = [s.text for s in world.sent if s.customer.external_userid == "wmBusy"]
    notice = apps[0].options().texts.rate_limited
    assert [len(engine.questions) for engine in engines] == [2, 2]  # both answered, together the limit
    assert texts.count(notice) == 1
    assert [t for t in texts if t != notice] == [f"答：m{n}" for n in range(4)]


async def test_what_one_instance_learns_about_a_session_the_other_knows() -> None:
    store, world = MemoryStateStore(), KfWorld()
    dify = FakeChatEngine()
    apps = [instance(store, world, GatedEngine(asyncio.Event(), dify), max_drains=2) for _ in range(2)]
    first, second = (app.sessions() for app in apps)
    rejections = [app.rejections() for app in apps]
    alice = CustomerRef(KF, "wmAlice")
    first.learn(alice, SessionState.HUMAN, servicer_userid="zhangsan")
    rejections[0].remember(alice, at=100.0)
    for part in (first, rejections[0]):
        writer = part.writer
        assert writer is not None
        await writer.flush()
    known = await second._shared(alice)  # noqa: SLF001  (the read the answering path makes)
    assert known is not None and known.state is SessionState.HUMAN and known.servicer_userid == "zhangsan"
    assert await rejections[1].refusing(alice)
    # Their own later message lifts the refusal for everyone.
    assert not await rejections[1].refusing(alice, message_time=200.0)
    writer = rejections[1].writer
    assert writer is not None
    await writer.flush()
    assert await store.get_notes(alice, ["refused"]) == {}


class ScanRecordingStore(MemoryStateStore):
    """The in-process store, recording what each scan asked not to read."""

    def __init__(self) -> None:
        super().__init__()
        self.scans: list[set[CustomerRef]] = []

    async def customers_with_pending(
        self, open_kfid: str, *, unread: Collection[CustomerRef] = ()
    ) -> list[CustomerRef]:
        self.scans.append(set(unread))
        return await super().customers_with_pending(open_kfid, unread=unread)


class CountedRoom(Room):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.looks = 0

    def room(self) -> int:
        self.looks += 1
        return super().room()


async def test_scans_read_no_inbox_without_room_and_not_those_of_customers_drained_here() -> None:
    """During a burst a scan read every waiting customer's inbox every 0.2 s, most of them to offer nobody
    (no room) or customers it was draining already: reads that were most of a scan's CPU."""
    store, world, gate = ScanRecordingStore(), KfWorld(), asyncio.Event()
    engine = GatedEngine(gate, FakeChatEngine())
    room = CountedRoom(5)
    app = instance(store, world, engine, max_drains=0, rate_limit=0)
    app.dispatcher.add_kwargs(capacity=room)
    dispatcher = app.dispatcher()
    customers = 20
    for c in range(customers):
        world.add_customer_text(KF, f"wm{c:02d}", "q")
    dispatcher.notify(KF, "t")
    await until(lambda: engine.waiting == 5)

    # No room: the scan looks at its room again and again, and reads nobody's inbox meanwhile.
    reads, looks = len(store.scans), room.looks
    dispatcher.scan(KF)
    await until(lambda: room.looks >= looks + 3)
    assert len(store.scans) == reads

    # Room for five more: the next scan reads the inboxes of all but the five customers being answered.
    held = {CustomerRef(KF, user.removeprefix(f"kf-{KF}-")) for user in engine.held}
    assert len(held) == 5
    room.limit = 10
    await until(lambda: engine.waiting == 10)
    assert any(held <= unread for unread in store.scans[reads:])

    gate.set()
    await until(lambda: len(world.sent) >= customers)
    await dispatcher.idle()
    assert sorted(s.customer.external_userid for s in world.sent) == [f"wm{c:02d}" for c in range(customers)]


class DrainingAtEachScan(MemoryStateStore):
    """The in-process store, noting how many customers the dispatcher was draining at each scan."""

    def __init__(self) -> None:
        super().__init__()
        self.dispatcher: Any = None
        self.draining: list[int] = []

    async def customers_with_pending(
        self, open_kfid: str, *, unread: Collection[CustomerRef] = ()
    ) -> list[CustomerRef]:
        self.draining.append(self.dispatcher.draining)
        return await super().customers_with_pending(open_kfid, unread=unread)


async def test_while_another_instance_answers_too_a_look_takes_half_of_those_waiting() -> None:
    """An instance whose limiter grew first (its pull came first) took nearly a whole burst: 66 % / 34 %."""
    store, world, gate = DrainingAtEachScan(), KfWorld(), asyncio.Event()
    engine = GatedEngine(gate, FakeChatEngine())
    app = instance(store, world, engine, max_drains=0, rate_limit=0)
    app.dispatcher.add_kwargs(capacity=Room(1000))  # room for everyone: only the share holds it back
    dispatcher = store.dispatcher = app.dispatcher()
    customers = 200
    for c in range(customers):
        world.add_customer_text(KF, f"wm{c:03d}", "q")
    # Another instance holds the pull lease and has recorded the burst in the shared inbox.
    assert await store.acquire_pull(KF, owner="the-other-instance", lease_s=60)
    other = app.pull()
    await other(KF, token="")
    dispatcher.notify(KF, "t")  # this instance finds the lease held: another instance is at work

    await until(lambda: engine.waiting == customers)
    # Half of the 200 at the first look, half of the other 100 (but at least FAIR_SHARE_FLOOR) at the next,
    # then the rest.
    assert store.draining[:3] == [0, 100, 100 + FAIR_SHARE_FLOOR]

    gate.set()
    await until(lambda: len(world.sent) >= customers)
    await dispatcher.idle()
    assert len(world.sent) == customers
