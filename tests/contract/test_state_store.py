"""The state store contract, one suite per role port (application/ports.py), run against every store.

Each `Test<Role>` class pins what the users of that role rely on; if a behaviour is not pinned here, it is not
part of the port. Every class runs against every store:

- `memory`: the in-process store (and the fake the use-case tests use);
- `memcached`, `memcached-2`: the shared store on one real memcached server and on two (consistent hashing);
- `failover`: the degraded-mode wrapper over a healthy real memcached and an in-process fallback;
- `failover-primary-down`: the same wrapper whose memcached is down from the start (a port nobody answers
  on): every role is then served by the fallback, and only `ping()` says the shared store is unreachable.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from adapters.outbound.memcached_store import MemcachedStateStore
from adapters.outbound.memory_store import MemoryStateStore
from application.failover_store import FailoverStateStore
from application.ports import (
    ConversationStore,
    CursorStore,
    Inbox,
    KfRegistry,
    MessageLedger,
    MessageState,
    PullCoordination,
    StateStore,
    StoreAdmin,
)
from domain.conversation import Conversation
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, KfEvent, Origin

pytestmark = pytest.mark.anyio

KF = "wkKF0001"
ALICE = CustomerRef(KF, "wmAlice")
BOB = CustomerRef(KF, "wmBob")
WEIRD_IDS = [
    "客户 张三",
    "with space",
    "new\nline",
    "tab\tand\r\nCRLF",
    "x" * 300,
    "客" * 300,
    "a:b",
    "#hash-lookalike",
    "",
]
# Backends whose state several instances share: their twin is a second store object on the same servers.
SHARED = frozenset({"memcached", "memcached-2", "failover"})
# Backends with a real, reachable memcached behind them (expiry there needs real time).
ON_MEMCACHED = SHARED
PRIMARY_DOWN = "failover-primary-down"

Elapse = Callable[[float], Awaitable[None]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _memcached(servers: list[tuple[str, int]], prefix: str) -> MemcachedStateStore:
    return MemcachedStateStore(servers=servers, prefix=prefix, connect_timeout=2, timeout=2)


def _open(request: pytest.FixtureRequest, backend: str, prefix: str, clock: FakeClock) -> StateStore:
    if backend == "memory":
        return MemoryStateStore(clock=clock)
    if backend in ("memcached", "failover"):
        shared = _memcached([request.getfixturevalue("memcached_server").server], prefix)
        if backend == "memcached":
            return shared
        return FailoverStateStore(shared, MemoryStateStore(clock=clock), retry_interval_s=3600)
    if backend == "memcached-2":
        return _memcached([server.server for server in request.getfixturevalue("memcached_pair")], prefix)
    assert backend == PRIMARY_DOWN
    down = MemcachedStateStore(
        servers=[request.getfixturevalue("unreachable_memcached")],
        prefix=prefix,
        connect_timeout=1,
        timeout=1,
    )
    # Never probed again during a test: the primary stays down.
    return FailoverStateStore(down, MemoryStateStore(clock=clock), retry_interval_s=3600)


async def _close(store: StateStore, backend: str, *, clear: bool = True) -> None:
    if isinstance(store, MemcachedStateStore | FailoverStateStore):
        try:
            if clear and backend in SHARED:
                await store.clear()  # leave as little as possible reachable on the shared test server
        finally:
            await store.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("memcached", marks=pytest.mark.memcached),
        pytest.param("memcached-2", marks=pytest.mark.memcached),
        pytest.param("failover", marks=pytest.mark.memcached),
        PRIMARY_DOWN,
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(
    request: pytest.FixtureRequest, backend: str, key_prefix: str, clock: FakeClock
) -> AsyncIterator[StateStore]:
    opened = _open(request, backend, key_prefix, clock)
    try:
        yield opened
    finally:
        await _close(opened, backend)


@pytest.fixture
async def neighbour(
    request: pytest.FixtureRequest, store: StateStore, backend: str, key_prefix: str, clock: FakeClock
) -> AsyncIterator[StateStore]:
    """Another service's store on the same backend (same servers, another prefix)."""
    opened = _open(request, backend, f"{key_prefix}-neighbour", clock)
    try:
        yield opened
    finally:
        await _close(opened, backend)


@pytest.fixture
async def twin(
    request: pytest.FixtureRequest, store: StateStore, backend: str, key_prefix: str, clock: FakeClock
) -> AsyncIterator[StateStore]:
    """Another instance of the same service (same namespace): the store itself where nothing is shared (the
    in-process store, and the failover store while its shared store is down)."""
    if backend not in SHARED:
        yield store
        return
    opened = _open(request, backend, key_prefix, clock)
    try:
        yield opened
    finally:
        await _close(opened, backend, clear=False)  # the store fixture clears the shared namespace


@pytest.fixture
def elapse(backend: str, clock: FakeClock) -> Elapse:
    """Let `seconds` pass for the store's expiry: in-process stores run on our clock; memcached needs real
    time (whole seconds, and a lease lasts up to one clock tick longer than asked)."""

    async def elapse(seconds: float) -> None:
        clock.now += seconds + 0.001
        if backend in ON_MEMCACHED:
            await anyio.sleep(math.ceil(seconds) + 1.1)

    return elapse


def message(
    msgid: str, *, customer: CustomerRef = ALICE, send_time: int = 1_700_000_000, text: str = "hi"
) -> InboundMessage:
    return InboundMessage(
        msgid=msgid,
        open_kfid=customer.open_kfid,
        external_userid=customer.external_userid,
        send_time=send_time,
        origin=Origin.CUSTOMER,
        msgtype="text",
        text=text,
    )


# --- ConversationStore ----------------------------------------------------------------------------------


class TestConversationStore:
    async def test_a_stored_conversation_is_read_back(self, store: ConversationStore) -> None:
        conversation = Conversation("conv-1", started_at=1.5, last_active_at=2.25, turns=3)
        await store.put_conversation(ALICE, conversation)
        assert await store.get_conversation(ALICE) == conversation

    async def test_an_unknown_customer_has_no_conversation(self, store: ConversationStore) -> None:
        assert await store.get_conversation(ALICE) is None

    async def test_put_replaces_the_conversation(self, store: ConversationStore) -> None:
        await store.put_conversation(ALICE, Conversation("old", 1.0, 1.0, 1))
        await store.put_conversation(ALICE, Conversation("new", 1.0, 9.0, 2))
        assert await store.get_conversation(ALICE) == Conversation("new", 1.0, 9.0, 2)

    async def test_conversations_are_kept_per_kf_account_and_customer(self, store: ConversationStore) -> None:
        same_user_other_kf = CustomerRef("wkOTHER", ALICE.external_userid)
        await store.put_conversation(ALICE, Conversation("alice", 1.0, 1.0, 1))
        await store.put_conversation(BOB, Conversation("bob", 1.0, 1.0, 1))
        await store.put_conversation(same_user_other_kf, Conversation("alice-other-kf", 1.0, 1.0, 1))
        assert (await store.get_conversation(ALICE)) == Conversation("alice", 1.0, 1.0, 1)
        assert (await store.get_conversation(BOB)) == Conversation("bob", 1.0, 1.0, 1)
        assert (await store.get_conversation(same_user_other_kf)) == Conversation(
            "alice-other-kf", 1.0, 1.0, 1
        )

    async def test_delete_says_whether_there_was_one(self, store: ConversationStore) -> None:
        await store.put_conversation(ALICE, Conversation("c", 1.0, 1.0, 1))
        assert await store.delete_conversation(ALICE) is True
        assert await store.get_conversation(ALICE) is None
        assert await store.delete_conversation(ALICE) is False

    async def test_delete_leaves_other_customers_alone(self, store: ConversationStore) -> None:
        await store.put_conversation(ALICE, Conversation("a", 1.0, 1.0, 1))
        await store.put_conversation(BOB, Conversation("b", 1.0, 1.0, 1))
        await store.delete_conversation(ALICE)
        assert await store.get_conversation(BOB) == Conversation("b", 1.0, 1.0, 1)


# --- MessageLedger --------------------------------------------------------------------------------------


class TestMessageLedger:
    KEY = DedupeKey(KF, "msg-1")

    async def test_an_unseen_message_is_new(self, store: MessageLedger) -> None:
        assert await store.state(self.KEY) is MessageState.NEW

    async def test_begin_succeeds_exactly_once(self, store: MessageLedger) -> None:
        assert await store.begin(self.KEY, owner="a", lease_s=30) is True
        assert await store.begin(self.KEY, owner="b", lease_s=30) is False
        assert await store.begin(self.KEY, owner="a", lease_s=30) is False
        assert await store.state(self.KEY) is MessageState.BUSY

    async def test_twenty_concurrent_begins_have_exactly_one_winner(self, store: MessageLedger) -> None:
        results: list[bool] = []

        async def attempt(owner: str) -> None:
            results.append(await store.begin(self.KEY, owner=owner, lease_s=30))

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(attempt, f"owner-{i}")
        assert sorted(results) == [False] * 19 + [True]

    async def test_a_finished_message_is_done_and_cannot_begin_again(self, store: MessageLedger) -> None:
        await store.begin(self.KEY, owner="a", lease_s=30)
        await store.finish(self.KEY)
        assert await store.state(self.KEY) is MessageState.DONE
        assert await store.begin(self.KEY, owner="a", lease_s=30) is False
        assert await store.begin(self.KEY, owner="b", lease_s=30) is False

    async def test_finish_without_begin_marks_done(self, store: MessageLedger) -> None:
        await store.finish(self.KEY)
        assert await store.state(self.KEY) is MessageState.DONE

    async def test_messages_are_told_apart_by_kf_account_and_msgid(self, store: MessageLedger) -> None:
        await store.finish(self.KEY)
        assert await store.state(DedupeKey(KF, "msg-2")) is MessageState.NEW
        assert await store.state(DedupeKey("wkOTHER", self.KEY.msgid)) is MessageState.NEW
        assert await store.begin(DedupeKey("wkOTHER", self.KEY.msgid), owner="a", lease_s=30) is True

    async def test_states_reads_every_key_in_order(self, store: MessageLedger) -> None:
        busy, done, freed, new = (DedupeKey(KF, f"msg-{name}") for name in ("busy", "done", "freed", "new"))
        await store.begin(busy, owner="a", lease_s=30)
        await store.finish(done)
        await store.begin(freed, owner="a", lease_s=30)
        await store.release(freed, owner="a")
        keys = [new, busy, done, freed, done, DedupeKey("wkOTHER", done.msgid)]
        expected = [MessageState.NEW, MessageState.BUSY, MessageState.DONE, MessageState.NEW]
        assert await store.states(keys) == [*expected, MessageState.DONE, MessageState.NEW]
        assert [await store.state(key) for key in keys] == await store.states(keys)
        assert await store.states([]) == []

    async def test_only_the_owner_renews(self, store: MessageLedger) -> None:
        await store.begin(self.KEY, owner="a", lease_s=30)
        assert await store.renew(self.KEY, owner="b", lease_s=30) is False
        assert await store.renew(self.KEY, owner="a", lease_s=30) is True
        assert await store.state(self.KEY) is MessageState.BUSY

    async def test_renew_fails_without_a_lease(self, store: MessageLedger) -> None:
        assert await store.renew(self.KEY, owner="a", lease_s=30) is False
        await store.begin(self.KEY, owner="a", lease_s=30)
        await store.finish(self.KEY)
        assert await store.renew(self.KEY, owner="a", lease_s=30) is False
        assert await store.state(self.KEY) is MessageState.DONE

    async def test_release_by_another_owner_changes_nothing(self, store: MessageLedger) -> None:
        await store.begin(self.KEY, owner="a", lease_s=30)
        await store.release(self.KEY, owner="b")
        assert await store.state(self.KEY) is MessageState.BUSY
        assert await store.begin(self.KEY, owner="b", lease_s=30) is False

    async def test_after_release_by_the_owner_another_owner_can_begin_at_once(
        self, store: MessageLedger
    ) -> None:
        await store.begin(self.KEY, owner="a", lease_s=30)
        await store.release(self.KEY, owner="a")
        assert await store.state(self.KEY) is MessageState.NEW
        assert await store.renew(self.KEY, owner="a", lease_s=30) is False
        assert await store.begin(self.KEY, owner="b", lease_s=30) is True
        assert await store.state(self.KEY) is MessageState.BUSY

    async def test_release_does_not_undo_done(self, store: MessageLedger) -> None:
        await store.begin(self.KEY, owner="a", lease_s=30)
        await store.finish(self.KEY)
        await store.release(self.KEY, owner="a")
        assert await store.state(self.KEY) is MessageState.DONE

    async def test_a_dead_holders_lease_expires_and_another_owner_can_begin(
        self, store: MessageLedger, elapse: Elapse
    ) -> None:
        await store.begin(self.KEY, owner="dead", lease_s=1)
        assert await store.begin(self.KEY, owner="b", lease_s=30) is False
        await elapse(1)
        assert await store.state(self.KEY) is MessageState.NEW
        assert await store.begin(self.KEY, owner="b", lease_s=30) is True
        assert await store.renew(self.KEY, owner="dead", lease_s=30) is False
        await store.release(self.KEY, owner="dead")
        assert await store.state(self.KEY) is MessageState.BUSY


# --- Inbox ----------------------------------------------------------------------------------------------


class TestInbox:
    async def test_recorded_messages_are_pending_oldest_first(self, store: Inbox) -> None:
        await store.record(
            [message("m3", send_time=30), message("m1", send_time=10), message("m2", send_time=20)]
        )
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1", "m2", "m3"]

    async def test_equal_send_times_keep_arrival_order(self, store: Inbox) -> None:
        await store.record([message("a", send_time=5), message("b", send_time=3), message("c", send_time=5)])
        await store.record([message("d", send_time=3), message("e", send_time=4), message("f", send_time=5)])
        assert [m.msgid for m in await store.pending(ALICE)] == ["b", "d", "e", "a", "c", "f"]

    async def test_record_is_idempotent_per_msgid_and_keeps_the_first_copy(self, store: Inbox) -> None:
        await store.record([message("m1", text="first"), message("m2")])
        await store.record([message("m1", text="second"), message("m2"), message("m1")])
        pending = await store.pending(ALICE)
        assert [(m.msgid, m.text) for m in pending] == [("m1", "first"), ("m2", "hi")]

    async def test_messages_round_trip_unchanged(self, store: Inbox) -> None:
        event = KfEvent(
            "enter_session", open_kfid=KF, external_userid=ALICE.external_userid, scene="s", status=2
        )
        originals = [
            InboundMessage(
                "t1", KF, ALICE.external_userid, 1, Origin.CUSTOMER, "text", text="你好 👋\nline", menu_id="m"
            ),
            InboundMessage("e1", KF, ALICE.external_userid, 2, Origin.SYSTEM, "event", event=event),
            InboundMessage(
                "l1",
                KF,
                ALICE.external_userid,
                3,
                Origin.CUSTOMER,
                "location",
                summary="位置",
                extra={"a": "b"},
            ),
        ]
        await store.record(originals)
        pending = await store.pending(ALICE)
        assert pending == originals
        assert [m.extra for m in pending] == [m.extra for m in originals]

    async def test_pending_is_per_customer(self, store: Inbox) -> None:
        await store.record([message("a1"), message("b1", customer=BOB), message("a2")])
        assert [m.msgid for m in await store.pending(ALICE)] == ["a1", "a2"]
        assert [m.msgid for m in await store.pending(BOB)] == ["b1"]
        assert await store.pending(CustomerRef(KF, "nobody")) == []

    async def test_remove_takes_one_message_out(self, store: Inbox) -> None:
        await store.record([message("m1", send_time=1), message("m2", send_time=2)])
        await store.remove(ALICE, "m1")
        assert [m.msgid for m in await store.pending(ALICE)] == ["m2"]

    async def test_remove_of_unknown_messages_or_customers_is_harmless(self, store: Inbox) -> None:
        await store.record([message("m1")])
        await store.remove(ALICE, "nope")
        await store.remove(CustomerRef(KF, "nobody"), "m1")
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1"]

    async def test_remove_returns_what_is_still_pending(self, store: Inbox) -> None:
        await store.record(
            [message("m1", send_time=1), message("m2", send_time=2), message("m3", send_time=3)]
        )
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1", "m2", "m3"]
        assert [m.msgid for m in await store.remove(ALICE, "m2")] == ["m1", "m3"]
        assert [m.msgid for m in await store.remove(ALICE, "nope")] == ["m1", "m3"]
        assert [m.msgid for m in await store.remove(ALICE, "m1")] == ["m3"]
        assert await store.remove(ALICE, "m3") == []
        assert await store.remove(ALICE, "m3") == []
        assert await store.remove(CustomerRef(KF, "nobody"), "m1") == []
        assert await store.pending(ALICE) == []

    @pytest.mark.parametrize("how", ["remove", "complete"])
    async def test_a_removal_after_another_instance_changed_the_inbox_keeps_that_change(
        self, store: StateStore, twin: StateStore, how: str
    ) -> None:
        first, second, third = (message(f"m{i}", send_time=i) for i in (1, 2, 3))
        await store.record([first, second])

        async def take_out(m: InboundMessage) -> list[str]:
            left = await (store.remove(ALICE, m.msgid) if how == "remove" else store.complete(m))
            return [m.msgid for m in left]

        assert await store.pending(ALICE) == [first, second]
        await twin.record([third])  # since this instance read the inbox
        assert await take_out(first) == ["m2", "m3"]
        assert await store.pending(ALICE) == [second, third]
        await twin.remove(ALICE, "m2")
        assert await take_out(second) == ["m3"]
        assert await store.pending(ALICE) == [third]
        await twin.remove(ALICE, "m3")  # the message is gone before this instance takes it out
        assert await take_out(third) == []
        assert await store.pending(ALICE) == []
        await twin.record([message("m4", send_time=4)])
        assert [m.msgid for m in await store.pending(ALICE)] == ["m4"]

    async def test_a_removed_message_can_be_recorded_again(self, store: Inbox) -> None:
        await store.record([message("m1")])
        await store.remove(ALICE, "m1")
        await store.record([message("m1")])
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1"]

    async def test_customers_with_pending_lists_each_customer_of_the_kf_once(self, store: Inbox) -> None:
        other_kf = CustomerRef("wkOTHER", "wmCarol")
        await store.record(
            [message("a1"), message("b1", customer=BOB), message("a2"), message("c1", customer=other_kf)]
        )
        assert sorted(await store.customers_with_pending(KF), key=str) == sorted([ALICE, BOB], key=str)
        assert await store.customers_with_pending("wkOTHER") == [other_kf]
        assert await store.customers_with_pending("wkNONE") == []

    async def test_a_customer_whose_messages_are_all_removed_is_no_longer_pending(self, store: Inbox) -> None:
        await store.record([message("a1"), message("a2"), message("b1", customer=BOB)])
        await store.remove(ALICE, "a1")
        assert sorted(await store.customers_with_pending(KF), key=str) == sorted([ALICE, BOB], key=str)
        await store.remove(ALICE, "a2")
        assert await store.customers_with_pending(KF) == [BOB]
        await store.record([message("a3")])
        assert sorted(await store.customers_with_pending(KF), key=str) == sorted([ALICE, BOB], key=str)

    async def test_customers_named_unread_are_listed_while_pending_and_the_rest_exactly(
        self, store: Inbox
    ) -> None:
        carol = CustomerRef(KF, "wmCarol")
        await store.record([message("a1"), message("b1", customer=BOB), message("c1", customer=carol)])
        await store.remove(carol, "c1")
        listed = await store.customers_with_pending(KF, unread=[ALICE])
        assert sorted(listed, key=str) == sorted([ALICE, BOB], key=str)
        await store.remove(BOB, "b1")
        assert await store.customers_with_pending(KF, unread=[ALICE, CustomerRef("wkOTHER", "wmBob")]) == [
            ALICE
        ]
        await store.remove(ALICE, "a1")
        assert await store.customers_with_pending(KF) == []

    async def test_concurrent_records_and_removes_lose_nothing(self, store: Inbox) -> None:
        customers = [CustomerRef(KF, f"wm{i}") for i in range(4)]
        await store.record([message("seed", customer=c) for c in customers])

        async def churn(customer: CustomerRef) -> None:
            for i in range(5):
                await store.record([message(f"n{i}", customer=customer, send_time=i)])
                await store.remove(customer, "seed" if i == 0 else f"n{i - 1}")

        async with anyio.create_task_group() as tasks:
            for customer in customers:
                tasks.start_soon(churn, customer)
        for customer in customers:
            assert [m.msgid for m in await store.pending(customer)] == ["n4"]
        assert sorted(await store.customers_with_pending(KF), key=str) == sorted(customers, key=str)

    async def test_recording_nothing_is_harmless(self, store: Inbox) -> None:
        await store.record([])
        assert await store.customers_with_pending(KF) == []


# --- MessageHandling ------------------------------------------------------------------------------------


class TestMessageHandling:
    KEY = DedupeKey(KF, "msg-1")

    async def test_claim_is_begin_for_a_message(self, store: StateStore) -> None:
        first, second = message("msg-1"), message("msg-2")
        assert await store.claim(first, owner="a", lease_s=30) is True
        assert await store.claim(first, owner="b", lease_s=30) is False
        assert await store.begin(self.KEY, owner="b", lease_s=30) is False
        assert await store.state(self.KEY) is MessageState.BUSY
        assert await store.renew(self.KEY, owner="a", lease_s=30) is True
        await store.release(self.KEY, owner="a")
        assert await store.claim(first, owner="b", lease_s=30) is True
        await store.finish(self.KEY)
        assert await store.claim(first, owner="b", lease_s=30) is False
        await store.begin(DedupeKey.for_message(second), owner="a", lease_s=30)
        assert await store.claim(second, owner="b", lease_s=30) is False

    async def test_the_conversation_after_a_claim_is_the_latest_one_this_store_wrote(
        self, store: StateStore
    ) -> None:
        first, second, third = (message(f"msg-{i}") for i in (1, 2, 3))
        conversation = Conversation("c1", 1.0, 2.0, 1)
        await store.put_conversation(ALICE, conversation)
        assert await store.claim(first, owner="a", lease_s=30)
        assert await store.get_conversation(ALICE) == conversation
        assert await store.claim(second, owner="a", lease_s=30)
        continued = Conversation("c1", 1.0, 3.0, 2)
        await store.put_conversation(ALICE, continued)
        assert await store.get_conversation(ALICE) == continued
        assert await store.claim(third, owner="a", lease_s=30)
        assert await store.delete_conversation(ALICE) is True
        assert await store.get_conversation(ALICE) is None
        assert await store.claim(message("b1", customer=BOB), owner="a", lease_s=30)
        assert await store.get_conversation(BOB) is None

    async def test_complete_marks_the_message_done_and_takes_it_out(self, store: StateStore) -> None:
        first, second = message("m1", send_time=1), message("m2", send_time=2)
        await store.record([first, second, message("b1", customer=BOB)])
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1", "m2"]
        assert await store.begin(DedupeKey.for_message(first), owner="a", lease_s=30)
        assert await store.complete(first) == [second]
        assert await store.state(DedupeKey.for_message(first)) is MessageState.DONE
        assert await store.pending(ALICE) == [second]
        assert await store.complete(second) == []  # without a lease too
        assert await store.state(DedupeKey.for_message(second)) is MessageState.DONE
        assert await store.pending(ALICE) == []
        assert [m.msgid for m in await store.pending(BOB)] == ["b1"]

    async def test_complete_of_a_message_not_in_the_inbox_still_marks_it_done(
        self, store: StateStore
    ) -> None:
        await store.record([message("m1")])
        assert [m.msgid for m in await store.complete(message("gone"))] == ["m1"]
        assert await store.state(DedupeKey(KF, "gone")) is MessageState.DONE
        assert await store.complete(message("b1", customer=BOB)) == []
        assert await store.state(DedupeKey(KF, "b1")) is MessageState.DONE

    async def test_concurrent_records_and_completes_lose_nothing(self, store: StateStore) -> None:
        customers = [CustomerRef(KF, f"wm{i}") for i in range(4)]
        await store.record([message("seed", customer=c) for c in customers])

        async def churn(customer: CustomerRef) -> None:
            previous = message("seed", customer=customer)
            for i in range(5):
                latest = message(f"{customer.external_userid}-n{i}", customer=customer, send_time=i)
                await store.record([latest])
                await store.pending(customer)
                assert latest in await store.complete(previous)
                previous = latest

        async with anyio.create_task_group() as tasks:
            for customer in customers:
                tasks.start_soon(churn, customer)
        for customer in customers:
            assert [m.msgid for m in await store.pending(customer)] == [f"{customer.external_userid}-n4"]
            assert await store.state(DedupeKey(KF, f"{customer.external_userid}-n3")) is MessageState.DONE


# --- CursorStore ----------------------------------------------------------------------------------------


class TestCursorStore:
    async def test_no_cursor_until_one_is_set(self, store: CursorStore) -> None:
        assert await store.get_cursor(KF) is None

    async def test_the_last_cursor_set_is_read_back_per_kf(self, store: CursorStore) -> None:
        await store.set_cursor(KF, "c1")
        await store.set_cursor(KF, "c2")
        await store.set_cursor("wkOTHER", "x9")
        assert await store.get_cursor(KF) == "c2"
        assert await store.get_cursor("wkOTHER") == "x9"


# --- PullCoordination -----------------------------------------------------------------------------------


class TestPullCoordination:
    async def test_the_pull_lease_is_exclusive(self, store: PullCoordination) -> None:
        assert await store.acquire_pull(KF, owner="a", lease_s=30) is True
        assert await store.acquire_pull(KF, owner="b", lease_s=30) is False
        assert await store.acquire_pull(KF, owner="a", lease_s=30) is False
        assert await store.acquire_pull("wkOTHER", owner="b", lease_s=30) is True

    async def test_twenty_concurrent_acquires_have_exactly_one_winner(self, store: PullCoordination) -> None:
        results: list[bool] = []

        async def attempt(owner: str) -> None:
            results.append(await store.acquire_pull(KF, owner=owner, lease_s=30))

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(attempt, f"owner-{i}")
        assert sorted(results) == [False] * 19 + [True]

    async def test_only_the_holder_renews_the_pull_lease(self, store: PullCoordination) -> None:
        assert await store.renew_pull(KF, owner="a", lease_s=30) is False
        await store.acquire_pull(KF, owner="a", lease_s=30)
        assert await store.renew_pull(KF, owner="b", lease_s=30) is False
        assert await store.renew_pull(KF, owner="a", lease_s=30) is True

    async def test_only_the_holder_releases_the_pull_lease(self, store: PullCoordination) -> None:
        await store.acquire_pull(KF, owner="a", lease_s=30)
        await store.release_pull(KF, owner="b")
        assert await store.acquire_pull(KF, owner="b", lease_s=30) is False
        await store.release_pull(KF, owner="a")
        assert await store.renew_pull(KF, owner="a", lease_s=30) is False
        assert await store.acquire_pull(KF, owner="b", lease_s=30) is True

    async def test_the_pull_lease_expires(self, store: PullCoordination, elapse: Elapse) -> None:
        await store.acquire_pull(KF, owner="dead", lease_s=1)
        await elapse(1)
        assert await store.acquire_pull(KF, owner="b", lease_s=30) is True
        assert await store.renew_pull(KF, owner="dead", lease_s=30) is False
        await store.release_pull(KF, owner="dead")
        assert await store.acquire_pull(KF, owner="c", lease_s=30) is False

    async def test_no_pull_requests_at_first(self, store: PullCoordination) -> None:
        assert await store.pull_requests(KF) == (0, "")

    async def test_each_request_bumps_the_counter_and_the_newest_token_is_kept(
        self, store: PullCoordination
    ) -> None:
        await store.request_pull(KF, "token-1")
        assert await store.pull_requests(KF) == (1, "token-1")
        await store.request_pull(KF, "token-2")
        assert await store.pull_requests(KF) == (2, "token-2")
        await store.request_pull(KF)
        assert await store.pull_requests(KF) == (3, "token-2")
        assert await store.pull_requests("wkOTHER") == (0, "")

    async def test_concurrent_requests_are_all_counted(self, store: PullCoordination) -> None:
        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(store.request_pull, KF, f"token-{i}")
        count, token = await store.pull_requests(KF)
        assert count == 20
        assert token.startswith("token-")


# --- KfRegistry -----------------------------------------------------------------------------------------


class TestKfRegistry:
    async def test_remembered_kfs_are_known_once_each(self, store: KfRegistry) -> None:
        assert await store.known_kfs() == []
        await store.remember_kf("wkA")
        await store.remember_kf("wkB")
        await store.remember_kf("wkA")
        assert sorted(await store.known_kfs()) == ["wkA", "wkB"]

    async def test_concurrent_remembers_are_all_kept(self, store: KfRegistry) -> None:
        async with anyio.create_task_group() as tasks:
            for i in range(10):
                tasks.start_soon(store.remember_kf, f"wk{i}")
        assert sorted(await store.known_kfs()) == sorted(f"wk{i}" for i in range(10))


# --- StoreAdmin -----------------------------------------------------------------------------------------


class TestStoreAdmin:
    async def test_ping_says_whether_the_shared_store_answers(self, store: StoreAdmin, backend: str) -> None:
        assert await store.ping() is (backend != PRIMARY_DOWN)

    async def test_backend_names_the_kind_of_store(self, store: StoreAdmin) -> None:
        assert store.backend in ("memory", "memcached")

    async def test_clear_forgets_conversations_inboxes_cursors_kf_accounts_and_pull_requests(
        self, store: StateStore
    ) -> None:
        await store.put_conversation(ALICE, Conversation("c", 1.0, 1.0, 1))
        await store.record([message("m3")])
        await store.set_cursor(KF, "cursor")
        await store.remember_kf(KF)
        await store.request_pull(KF, "token")

        await store.clear()

        assert await store.get_conversation(ALICE) is None
        assert await store.pending(ALICE) == []
        assert await store.customers_with_pending(KF) == []
        assert await store.get_cursor(KF) is None
        assert await store.known_kfs() == []
        assert await store.pull_requests(KF) == (0, "")

    async def test_clear_keeps_done_marks_and_leases(self, store: StateStore) -> None:
        """What keeps a message answered at most once survives a clear (StoreAdmin.clear)."""
        done, held = DedupeKey(KF, "m1"), DedupeKey(KF, "m2")
        await store.finish(done)
        await store.begin(held, owner="a", lease_s=30)
        await store.acquire_pull(KF, owner="a", lease_s=30)

        await store.clear()

        assert await store.states([done, held]) == [MessageState.DONE, MessageState.BUSY]
        assert await store.begin(done, owner="b", lease_s=30) is False
        assert await store.begin(held, owner="b", lease_s=30) is False
        assert await store.renew(held, owner="a", lease_s=30) is True
        assert await store.acquire_pull(KF, owner="b", lease_s=30) is False
        assert await store.renew_pull(KF, owner="a", lease_s=30) is True
        await store.release(held, owner="a")
        await store.release_pull(KF, owner="a")
        assert await store.begin(held, owner="b", lease_s=30) is True
        assert await store.acquire_pull(KF, owner="b", lease_s=30) is True

    async def test_clear_leaves_another_namespace_alone(
        self, store: StateStore, neighbour: StateStore
    ) -> None:
        key = DedupeKey(KF, "m1")
        for s in (store, neighbour):
            await s.put_conversation(ALICE, Conversation("c", 1.0, 1.0, 1))
            await s.finish(key)
            await s.record([message("m3")])
            await s.set_cursor(KF, "cursor")
            await s.remember_kf(KF)

        await store.clear()

        assert await store.get_conversation(ALICE) is None
        assert await neighbour.get_conversation(ALICE) == Conversation("c", 1.0, 1.0, 1)
        assert await neighbour.state(key) is MessageState.DONE
        assert [m.msgid for m in await neighbour.pending(ALICE)] == ["m3"]
        assert await neighbour.get_cursor(KF) == "cursor"
        assert await neighbour.known_kfs() == [KF]

    async def test_the_store_works_again_after_clear(self, store: StateStore) -> None:
        await store.clear()
        await store.clear()
        await store.finish(DedupeKey(KF, "m1"))
        await store.set_cursor(KF, "after")
        assert await store.state(DedupeKey(KF, "m1")) is MessageState.DONE
        assert await store.get_cursor(KF) == "after"


# --- Ids from the outside world -------------------------------------------------------------------------


class TestAnyIds:
    async def test_ids_with_any_characters_or_length_work_and_stay_apart(self, store: StateStore) -> None:
        customers = [CustomerRef(kf, user) for kf in WEIRD_IDS[:4] for user in WEIRD_IDS]
        for i, customer in enumerate(customers):
            await store.put_conversation(customer, Conversation(f"conv-{i}", 1.0, 1.0, 1))
        for i, customer in enumerate(customers):
            assert await store.get_conversation(customer) == Conversation(f"conv-{i}", 1.0, 1.0, 1)

    async def test_every_port_accepts_weird_ids(self, store: StateStore) -> None:
        for weird in WEIRD_IDS:
            customer = CustomerRef(weird, weird)
            key = DedupeKey(weird, weird)
            assert await store.begin(key, owner=weird, lease_s=30) is True
            assert await store.renew(key, owner=weird, lease_s=30) is True
            await store.finish(key)
            assert await store.state(key) is MessageState.DONE
            await store.record([message(weird, customer=customer, text=weird)])
            assert [m.text for m in await store.pending(customer)] == [weird]
            assert customer in await store.customers_with_pending(weird)
            await store.remove(customer, weird)
            assert await store.pending(customer) == []
            await store.set_cursor(weird, weird)
            assert await store.get_cursor(weird) == weird
            assert await store.acquire_pull(weird, owner=weird, lease_s=30) is True
            await store.request_pull(weird, weird)
            assert await store.pull_requests(weird) == (1, weird)
            await store.remember_kf(weird)
        assert sorted(await store.known_kfs()) == sorted(WEIRD_IDS)

    async def test_a_separator_inside_an_id_does_not_merge_keys(self, store: StateStore) -> None:
        await store.put_conversation(CustomerRef("a:b", "c"), Conversation("first", 1.0, 1.0, 1))
        assert await store.get_conversation(CustomerRef("a", "b:c")) is None
        await store.finish(DedupeKey("a:b", "c"))
        assert await store.state(DedupeKey("a", "b:c")) is MessageState.NEW


class TestTheMatrix:
    async def test_a_failover_store_is_degraded_exactly_when_its_primary_is_down(
        self, store: StateStore, backend: str
    ) -> None:
        await store.set_cursor(KF, "c1")
        assert await store.get_cursor(KF) == "c1"
        if isinstance(store, FailoverStateStore):
            assert store.degraded is (backend == PRIMARY_DOWN)
