"""MemcachedStateStore beyond the contract: keys, TTLs, encoding, and what happens when servers fail."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymemcache.client.base import Client, check_key_helper

from adapters.outbound import memcached_keyspace, memcached_store
from adapters.outbound import state_codec as codec
from adapters.outbound.memcached_inbox import INBOX_MAX_MESSAGES
from adapters.outbound.memcached_keyspace import (
    MAX_RELATIVE_TTL_S,
    build_key,
    expire_for,
    lease_expire_for,
)
from adapters.outbound.memcached_store import MemcachedStateStore
from application.errors import StoreUnavailable
from application.ports import MessageState
from domain.conversation import Conversation
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, KfEvent, Origin
from tests.support.memcached import MemcachedProcess, start_memcached

KF = "wkKF0001"
ALICE = CustomerRef(KF, "wmAlice")
FAST: dict[str, Any] = {"connect_timeout": 0.5, "timeout": 0.5}


class ShiftedTime:
    """The `time` module as the store sees it, with a monotonic clock the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def prefix() -> str:
    return f"unit-{uuid.uuid4().hex[:12]}"


class RawSerde:
    """Hands back (bytes, flags) as stored."""

    def serialize(self, key: str, value: bytes) -> tuple[bytes, int]:
        return value, 0

    def deserialize(self, key: str, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


def message(msgid: str, *, send_time: int = 1_700_000_000) -> InboundMessage:
    return InboundMessage(msgid, KF, ALICE.external_userid, send_time, Origin.CUSTOMER, "text", text="hi")


# --- keys -----------------------------------------------------------------------------------------------


class TestKeys:
    @pytest.mark.parametrize(
        "part",
        ["客户 张三", "with space", "new\nline", "nul\x00", "x" * 300, "客" * 300, "a:b", "", "\ud800"],
    )
    def test_any_id_gives_a_valid_memcached_key(self, part: str) -> None:
        key = build_key("kfdify", 1_718_000_000_000, "inbox", part, part)
        check_key_helper(key, allow_unicode_keys=False)  # raises on whitespace, control chars, > 250 bytes
        assert len(key.encode()) <= 250

    def test_plain_ids_stay_readable(self) -> None:
        assert build_key("kfdify", 7, "msg", "wkAbc-1", "msg_1.2") == "kfdify:7:msg:wkAbc-1:msg_1.2"

    def test_other_ids_are_hashed_and_cannot_collide_with_plain_ones(self) -> None:
        key = build_key("p", 1, "conv", "a:b", "c")
        assert key.startswith("p:1:conv:#") and key.endswith(":c")
        assert build_key("p", 1, "conv", "a:b", "c") != build_key("p", 1, "conv", "a", "b:c")

    def test_long_plain_ids_are_hashed_only_when_the_key_would_be_too_long(self) -> None:
        assert build_key("p", 1, "cursor", "a" * 200) == "p:1:cursor:" + "a" * 200
        long_key = build_key("p", 1, "conv", "a" * 200, "b" * 200)
        assert len(long_key) <= 250
        assert long_key != build_key("p", 1, "conv", "a" * 200, "b" * 199 + "c")

    @given(st.text(), st.text())
    def test_distinct_ids_give_distinct_keys(self, a: str, b: str) -> None:
        if a != b:
            assert build_key("p", 1, "conv", KF, a) != build_key("p", 1, "conv", KF, b)

    def test_the_prefix_must_be_key_safe(self) -> None:
        for bad in ("", "has space", "x" * 65, "a:b"):
            with pytest.raises(ValueError):
                MemcachedStateStore(servers=[("127.0.0.1", 1)], prefix=bad)

    def test_no_servers_or_an_empty_pool_is_refused(self) -> None:
        with pytest.raises(ValueError):
            MemcachedStateStore(servers=[])
        with pytest.raises(ValueError):
            MemcachedStateStore(servers=[("127.0.0.1", 1)], max_pool_size=0)


# --- TTLs -----------------------------------------------------------------------------------------------


class TestTtls:
    def test_zero_or_less_means_never(self) -> None:
        assert expire_for(0, now=1e9) == 0
        assert expire_for(-5, now=1e9) == 0

    def test_ttls_are_rounded_up_to_whole_seconds(self) -> None:
        assert expire_for(0.2, now=1e9) == 1
        assert expire_for(1.5, now=1e9) == 2
        assert expire_for(86400, now=1e9) == 86400

    def test_ttls_beyond_thirty_days_become_absolute_times(self) -> None:
        assert expire_for(MAX_RELATIVE_TTL_S, now=1e9) == MAX_RELATIVE_TTL_S
        assert (
            expire_for(MAX_RELATIVE_TTL_S + 1, now=1_000_000_000.7) == 1_000_000_000 + MAX_RELATIVE_TTL_S + 1
        )

    def test_a_lease_lasts_at_least_as_long_as_asked(self) -> None:
        # memcached's clock ticks once a second: an item with exptime n lives between n-1 and n seconds.
        assert lease_expire_for(0.1, now=1e9) == 2
        assert lease_expire_for(1, now=1e9) == 2
        assert lease_expire_for(29.5, now=1e9) == 31


# --- encoding -------------------------------------------------------------------------------------------

ids = st.text(max_size=40)
events = st.builds(
    KfEvent,
    event_type=ids,
    open_kfid=ids,
    external_userid=ids,
    welcome_code=ids,
    scene=ids,
    scene_param=ids,
    fail_msgid=ids,
    fail_type=st.none() | st.integers(-(2**31), 2**31),
    change_type=st.none() | st.integers(-(2**31), 2**31),
    msg_code=ids,
    servicer_userid=ids,
    old_servicer_userid=ids,
    new_servicer_userid=ids,
    recall_msgid=ids,
    status=st.none() | st.integers(-(2**31), 2**31),
)
messages = st.builds(
    InboundMessage,
    msgid=ids,
    open_kfid=ids,
    external_userid=ids,
    send_time=st.integers(0, 2**40),
    origin=st.sampled_from(Origin),
    msgtype=ids,
    text=st.text(),
    menu_id=ids,
    media_id=ids,
    event=st.none() | events,
    summary=ids,
    extra=st.dictionaries(ids, ids, max_size=4),
)


class TestCodec:
    @given(st.lists(messages, max_size=4))
    def test_messages_round_trip_exactly(self, originals: list[InboundMessage]) -> None:
        decoded = codec.decode_messages(codec.encode_messages(originals))
        assert decoded == originals
        assert [m.extra for m in decoded] == [m.extra for m in originals]
        assert [type(m.origin) for m in decoded] == [Origin] * len(originals)

    @given(st.builds(Conversation, ids, st.floats(0, 2e9), st.floats(0, 2e9), st.integers(0, 10**6)))
    def test_conversations_round_trip_exactly(self, original: Conversation) -> None:
        assert codec.decode_conversation(codec.encode_conversation(original)) == original

    def test_values_are_plain_json(self) -> None:
        data = codec.encode_messages([message("m1")])
        assert json.loads(data)[0]["msgid"] == "m1"

    def test_unknown_fields_are_ignored_and_absent_ones_defaulted(self) -> None:
        data = b'[{"msgid":"m","open_kfid":"k","origin":3,"msgtype":"text","future_field":1}]'
        assert codec.decode_messages(data) == [InboundMessage("m", "k", "", 0, Origin.CUSTOMER, "text")]

    @pytest.mark.parametrize("garbage", [b"\x80\x04pickle", b"{", b"[1]", b'{"msgid":1}', b"\xff"])
    def test_garbage_is_refused(self, garbage: bytes) -> None:
        with pytest.raises(codec.UndecodableValue):
            codec.decode_messages(garbage)
        with pytest.raises(codec.UndecodableValue):
            codec.decode_conversation(garbage)

    def test_an_unreadable_mark_reads_as_held_never_as_free(self) -> None:
        assert codec.decode_mark(b"garbage") == codec.Mark(codec.BUSY, "")
        assert codec.decode_mark(b'{"s":"weird"}') == codec.Mark(codec.BUSY, "")


# --- against a real server ------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[MemcachedProcess]:
    process = start_memcached()
    try:
        yield process
    finally:
        process.kill()  # its data need not survive; SIGTERM would take a second


@pytest.fixture
def second_server() -> Iterator[MemcachedProcess]:
    process = start_memcached()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
async def store(server: MemcachedProcess) -> AsyncIterator[MemcachedStateStore]:
    opened = MemcachedStateStore(servers=[server.server], prefix=prefix(), **FAST)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.mark.anyio
@pytest.mark.memcached
class TestSharedBetweenInstances:
    async def test_two_instances_with_the_same_prefix_share_everything(
        self, server: MemcachedProcess
    ) -> None:
        shared = prefix()
        a = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
        b = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
        try:
            key = DedupeKey(KF, "m1")
            assert await a.begin(key, owner="a", lease_s=30)
            assert await b.state(key) is MessageState.BUSY
            assert not await b.begin(key, owner="b", lease_s=30)
            await a.finish(key)
            assert await b.state(key) is MessageState.DONE
            await a.put_conversation(ALICE, Conversation("c1", 1.0, 2.0, 3))
            assert await b.get_conversation(ALICE) == Conversation("c1", 1.0, 2.0, 3)
            await a.record([message("m2")])
            assert [m.msgid for m in await b.pending(ALICE)] == ["m2"]
            assert await b.customers_with_pending(KF) == [ALICE]
            await a.set_cursor(KF, "cur")
            assert await b.get_cursor(KF) == "cur"
            await a.request_pull(KF, "tok")
            assert await b.pull_requests(KF) == (1, "tok")
            await a.remember_kf(KF)
            assert await b.known_kfs() == [KF]
        finally:
            await a.aclose()
            await b.aclose()

    async def test_a_clear_on_one_instance_reaches_the_other_once_its_cached_generation_ages_out(
        self, server: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        clock = ShiftedTime()
        monkeypatch.setattr(memcached_store, "time", clock)
        monkeypatch.setattr(memcached_keyspace, "time", clock)  # the generation cache lives there
        shared = prefix()
        a = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
        b = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
        try:
            await b.set_cursor(KF, "before")
            await a.clear()
            assert await a.get_cursor(KF) is None
            # B's generation is at most GENERATION_CACHE_S old: once that much time has passed, B reads the
            # new one on its next command (the clock is the test's, not the wall's).
            clock.advance(memcached_keyspace.GENERATION_CACHE_S)
            assert await b.get_cursor(KF) is None
        finally:
            await a.aclose()
            await b.aclose()

    async def test_concurrent_records_from_two_instances_are_all_kept(self, server: MemcachedProcess) -> None:
        shared = prefix()
        a = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
        b = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
        try:
            async with anyio.create_task_group() as tasks:
                for i in range(20):
                    tasks.start_soon((a if i % 2 else b).record, [message(f"m{i:02}", send_time=i)])
            assert [m.msgid for m in await a.pending(ALICE)] == [f"m{i:02}" for i in range(20)]
        finally:
            await a.aclose()
            await b.aclose()


@pytest.mark.anyio
@pytest.mark.memcached
class TestStoredValues:
    async def test_values_are_json_never_pickle(self, server: MemcachedProcess) -> None:
        namespace = prefix()
        store = MemcachedStateStore(servers=[server.server], prefix=namespace, **FAST)
        raw = Client(server.server, serde=RawSerde(), default_noreply=False, connect_timeout=1, timeout=1)
        try:
            await store.put_conversation(ALICE, Conversation("c1", 1.0, 2.0, 3))
            await store.begin(DedupeKey(KF, "m1"), owner="inst-1", lease_s=30)
            await store.record([message("m2")])
            await store.set_cursor(KF, "cur")
            await store.remember_kf(KF)
            ledger = int(raw.get(f"{namespace}:gen")[0])
            generation = int(raw.get(f"{namespace}:data:gen")[0])

            def stored(kind: str, *parts: str) -> object:
                in_generation = ledger if kind in ("msg", "pull") else generation
                value, flags = raw.get(build_key(namespace, in_generation, kind, *parts))
                assert not value.startswith(b"\x80")  # pickle protocol 2+ starts with PROTO
                assert flags == 0  # pymemcache's pickle serde would set FLAG_PICKLE
                return json.loads(value)

            assert stored("conv", KF, ALICE.external_userid) == {
                "conversation_id": "c1",
                "started_at": 1.0,
                "last_active_at": 2.0,
                "turns": 3,
            }
            assert stored("msg", KF, "m1") == {"s": "busy", "o": "inst-1"}
            inbox = stored("inbox", KF, ALICE.external_userid)
            assert isinstance(inbox, list) and inbox[0]["msgid"] == "m2"
            assert stored("cursor", KF) == "cur"
            assert stored("kfs") == [KF]
        finally:
            raw.close()
            await store.aclose()

    async def test_a_conversation_ttl_beyond_thirty_days_still_stores(self, server: MemcachedProcess) -> None:
        # Sent as a relative 40-day TTL, memcached would read it as a Unix time in 1970: expired at once.
        store = MemcachedStateStore(
            servers=[server.server], prefix=prefix(), conversation_idle_ttl_s=40 * 86400, **FAST
        )
        try:
            await store.put_conversation(ALICE, Conversation("c1", 1.0, 2.0, 3))
            assert await store.get_conversation(ALICE) == Conversation("c1", 1.0, 2.0, 3)
        finally:
            await store.aclose()

    async def test_an_overfull_inbox_keeps_the_newest_messages_and_says_so(
        self, store: MemcachedStateStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        await store.record([message(f"m{i:04}", send_time=i) for i in range(INBOX_MAX_MESSAGES + 10)])
        pending = await store.pending(ALICE)
        assert len(pending) == INBOX_MAX_MESSAGES
        assert pending[0].msgid == "m0010"
        assert "is full" in caplog.text

    async def test_marks_of_the_earlier_single_generation_layout_stay_valid_and_survive_clear(
        self, server: MemcachedProcess
    ) -> None:
        """Before the data generation existed, everything lived under `{prefix}:gen`: instances of that
        version and this one share the marks during a rolling upgrade."""
        namespace = prefix()
        raw = Client(server.server, default_noreply=False, connect_timeout=1, timeout=1)
        store = MemcachedStateStore(servers=[server.server], prefix=namespace, **FAST)
        try:
            raw.set(f"{namespace}:gen", b"1718000000000")
            raw.set(
                build_key(namespace, 1718000000000, "msg", KF, "old"),
                codec.encode_mark(codec.Mark(codec.DONE)),
            )
            assert await store.state(DedupeKey(KF, "old")) is MessageState.DONE
            await store.clear()
            assert await store.state(DedupeKey(KF, "old")) is MessageState.DONE
            assert raw.get(f"{namespace}:gen") == b"1718000000000"
        finally:
            raw.close()
            await store.aclose()

    async def test_unreadable_values_are_not_mistaken_for_absent_marks(
        self, server: MemcachedProcess, store: MemcachedStateStore
    ) -> None:
        await store.finish(DedupeKey(KF, "m1"))  # creates the generations
        raw = Client(server.server, default_noreply=False, connect_timeout=1, timeout=1)
        try:
            ledger = int(raw.get(f"{store._prefix}:gen"))
            raw.set(build_key(store._prefix, ledger, "msg", KF, "m2"), b"\x80garbage")
        finally:
            raw.close()
        assert await store.state(DedupeKey(KF, "m2")) is MessageState.BUSY
        assert await store.begin(DedupeKey(KF, "m2"), owner="a", lease_s=30) is False

    async def test_recording_for_an_indexed_customer_is_two_round_trips(
        self, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.record([message("m1")])  # indexes the customer
        requests: list[bytes] = []
        call = store._client._call

        async def counted(node: str, request: bytes, parse: Any) -> Any:
            if b":gen\r\n" not in request:  # the namespace generation, re-read once a second
                requests.append(request.split(b" ", 1)[0])
            return await call(node, request, parse)

        monkeypatch.setattr(store._client, "_call", counted)
        await store.record([message("m2", send_time=1_700_000_001)])
        assert requests == [b"gets", b"cas"]  # index and inbox read at once; the index needs no write
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1", "m2"]

    @staticmethod
    def count_round_trips(store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
        """The commands of each round trip (the verbs, in the order sent), leaving out generation reads."""
        trips: list[list[bytes]] = []
        call = store._client._call

        async def counted(node: str, request: bytes, parse: Any) -> Any:
            if b":gen\r\n" not in request:
                lines = request.split(b"\r\n")
                trips.append(
                    [
                        line.split(b" ", 1)[0]
                        for line in lines
                        if line[:4] in (b"get ", b"gets", b"set ", b"add ", b"cas ")
                    ]
                )
            return await call(node, request, parse)

        monkeypatch.setattr(store._client, "_call", counted)
        return trips

    async def test_a_page_of_marks_and_a_page_of_customers_are_one_round_trip_each(
        self, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        customers = [CustomerRef(KF, f"wm{i}") for i in range(20)]
        batch = [
            InboundMessage(f"m{i}", KF, c.external_userid, 1_700_000_000, Origin.CUSTOMER, "text", text="hi")
            for i, c in enumerate(customers)
        ]
        await store.record(batch[:1])
        trips = self.count_round_trips(store, monkeypatch)
        assert await store.states([DedupeKey.for_message(m) for m in batch]) == [MessageState.NEW] * 20
        await store.record(batch)
        # The marks; every index and inbox; the index; every new inbox at once, then the index again (a scan
        # may have unindexed a customer whose inbox it saw still empty) in the same round trip.
        assert trips == [[b"get"], [b"gets"], [b"cas"], [b"add"] * 19 + [b"get"]]
        for c in customers:
            assert len(await store.pending(c)) == 1

    async def test_a_drained_message_is_three_round_trips(
        self, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        first, second = message("m1"), message("m2", send_time=1_700_000_001)
        await store.record([first, second])
        trips = self.count_round_trips(store, monkeypatch)
        assert await store.pending(ALICE) == [first, second]
        assert await store.begin(DedupeKey.for_message(first), owner="me", lease_s=30)
        assert await store.complete(first) == [second]
        # Read the inbox; claim; mark done and take out of the inbox in one go (in that order), with the
        # CAS token of the first read.
        assert trips == [[b"gets"], [b"add"], [b"set", b"cas"]]
        assert await store.state(DedupeKey.for_message(first)) is MessageState.DONE
        assert await store.pending(ALICE) == [second]

    async def test_a_claim_reads_the_conversation_in_the_same_round_trip(
        self, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        conversation = Conversation("c1", 1.0, 2.0, 1)
        await store.put_conversation(ALICE, conversation)
        trips = self.count_round_trips(store, monkeypatch)
        assert await store.claim(message("m1"), owner="me", lease_s=30)
        assert await store.get_conversation(ALICE) == conversation
        assert trips == [[b"add", b"get"]]
        assert await store.get_conversation(ALICE) == conversation  # used once: read again
        assert len(trips) == 2
        assert not await store.claim(message("m1"), owner="other", lease_s=30)  # no claim, nothing kept
        assert await store.get_conversation(ALICE) == conversation
        assert trips[2:] == [[b"add", b"get"], [b"gets"], [b"get"]]

    async def test_a_conversation_read_with_a_claim_is_used_only_while_fresh(
        self, server: MemcachedProcess, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.put_conversation(ALICE, Conversation("old", 1.0, 2.0, 1))
        assert await store.claim(message("m1"), owner="me", lease_s=30)
        other = MemcachedStateStore(servers=[server.server], prefix=store._prefix, **FAST)
        try:
            await other.put_conversation(ALICE, Conversation("new", 1.0, 3.0, 2))
        finally:
            await other.aclose()
        monkeypatch.setattr(memcached_store, "CONVERSATION_READ_MAX_AGE_S", 0.0)
        await asyncio.sleep(0.01)
        assert await store.get_conversation(ALICE) == Conversation("new", 1.0, 3.0, 2)

    async def test_a_completion_after_the_inbox_changed_reads_it_again(
        self, server: MemcachedProcess, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        first, second = message("m1"), message("m2", send_time=1_700_000_001)
        await store.record([first])
        assert await store.pending(ALICE) == [first]
        other = MemcachedStateStore(servers=[server.server], prefix=store._prefix, **FAST)
        try:
            await other.record([second])
        finally:
            await other.aclose()
        trips = self.count_round_trips(store, monkeypatch)
        assert await store.complete(first) == [second]
        assert trips == [[b"set", b"cas"], [b"gets"], [b"cas"]]
        assert await store.state(DedupeKey.for_message(first)) is MessageState.DONE
        assert await store.pending(ALICE) == [second]

    async def test_a_scan_reads_no_inbox_of_a_customer_named_unread_and_keeps_them_indexed(
        self, store: MemcachedStateStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        bob, carol = CustomerRef(KF, "wmBob"), CustomerRef(KF, "wmCarol")
        await store.record([message("a1"), replace(message("b1"), external_userid="wmBob")])
        await store.record([replace(message("c1"), external_userid="wmCarol")])
        await store.remove(ALICE, "a1")  # Alice's inbox is empty now; she stays indexed until a scan reads it
        requests: list[bytes] = []
        call = store._client._call

        async def recorded(node: str, request: bytes, parse: Any) -> Any:
            if b":gen\r\n" not in request:
                requests.append(request)
            return await call(node, request, parse)

        monkeypatch.setattr(store._client, "_call", recorded)
        listed = await store.customers_with_pending(KF, unread=[ALICE, bob])
        # Alice and Bob as the index has them (Alice without her empty inbox being seen), Carol as read.
        assert listed == [ALICE, bob, carol]
        index_read, inboxes_read = (request.split(b"\r\n")[0].split(b" ") for request in requests)
        assert (len(index_read), len(inboxes_read)) == (2, 2)  # the index; one inbox: Carol's
        # Read at last, Alice's empty inbox takes her out of the index.
        assert await store.customers_with_pending(KF) == [bob, carol]
        assert await store.customers_with_pending(KF, unread=[ALICE]) == [bob, carol]


@pytest.mark.anyio
@pytest.mark.memcached
class TestServerFailures:
    async def test_a_killed_server_raises_store_unavailable_quickly(
        self, server: MemcachedProcess, store: MemcachedStateStore
    ) -> None:
        key = DedupeKey(KF, "m1")
        await store.finish(key)
        server.kill()
        operations = [
            store.state(key),
            store.begin(key, owner="a", lease_s=30),
            store.get_conversation(ALICE),
            store.pending(ALICE),
            store.record([message("m2")]),
            store.get_cursor(KF),
            store.acquire_pull(KF, owner="a", lease_s=30),
            store.request_pull(KF, "t"),
            store.known_kfs(),
            store.clear(),
        ]
        for operation in operations:
            # The bound only guards against a hang; the outcome is the point: a refused or closed connection,
            # told at once, never a wait for the server's answer or for a free connection ("... within N s").
            with anyio.fail_after(30), pytest.raises(StoreUnavailable) as raised:
                await operation
            assert "within" not in str(raised.value), raised.value
        assert await store.ping() is False

    async def test_a_hung_server_raises_within_the_timeout_without_blocking_the_loop(
        self, server: MemcachedProcess, store: MemcachedStateStore
    ) -> None:
        await store.finish(DedupeKey(KF, "m1"))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0)  # one tick per turn of the event loop, whatever the time
                ticks += 1

        server.pause()  # returns once the server can no longer answer
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(tick)
                # Ended by the store's timeout; the outer bound only guards against a hang far beyond it.
                with anyio.fail_after(30), pytest.raises(StoreUnavailable) as raised:
                    await store.state(DedupeKey(KF, "m1"))
                tasks.cancel_scope.cancel()
            # It did wait for the answer, and gave up at the configured timeout.
            assert f"did not answer within {FAST['timeout']:g} s" in str(raised.value), raised.value
            # The event loop kept running other tasks while the command waited (a blocking read would have
            # held it for the whole timeout: no tick at all).
            assert ticks >= 2
            assert await store.ping() is False
        finally:
            server.resume()
        assert await store.state(DedupeKey(KF, "m1")) is MessageState.DONE

    async def test_after_a_restart_on_the_same_port_it_works_again_at_once(
        self, server: MemcachedProcess, store: MemcachedStateStore
    ) -> None:
        # Several pooled connections, all of which go stale with the restart.
        async with anyio.create_task_group() as tasks:
            for i in range(8):
                tasks.start_soon(store.finish, DedupeKey(KF, f"m{i}"))
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.state(DedupeKey(KF, "m0"))
        server.restart()
        assert await store.ping() is True
        results = []
        for i in range(8):
            results.append(await store.begin(DedupeKey(KF, f"m{i}"), owner="a", lease_s=30))
        # A restarted memcached is empty: the marks are gone, and no operation failed on a stale connection.
        assert results == [True] * 8

    async def test_a_closed_store_refuses_work(self, server: MemcachedProcess) -> None:
        store = MemcachedStateStore(servers=[server.server], prefix=prefix(), **FAST)
        await store.set_cursor(KF, "c")
        await store.aclose()
        store.close()  # idempotent
        with pytest.raises(StoreUnavailable):
            await store.get_cursor(KF)
        assert await store.ping() is False
        assert not [t for t in threading.enumerate() if t.name.startswith("memcached")]  # no thread pool


@pytest.mark.anyio
@pytest.mark.memcached
class TestTwoServers:
    async def test_keys_on_a_dead_node_raise_and_never_read_as_new_or_missing(
        self, server: MemcachedProcess, second_server: MemcachedProcess
    ) -> None:
        servers = [server.server, second_server.server]
        store = MemcachedStateStore(servers=servers, prefix=prefix(), **FAST)
        while store._client.node_for(store._ledger_gen_key) != store._client.node_for(store._data_gen_key):
            await store.aclose()  # both generations on one node, which we keep alive below
            store = MemcachedStateStore(servers=servers, prefix=prefix(), **FAST)
        try:
            await store.clear()
            keys = [DedupeKey(KF, f"m{i}") for i in range(40)]
            customers = [CustomerRef(KF, f"wm{i}") for i in range(40)]
            for key, customer in zip(keys, customers, strict=True):
                await store.finish(key)
                await store.put_conversation(customer, Conversation(key.msgid, 1.0, 1.0, 1))
            generation_node = store._client.node_for(f"{store._prefix}:gen")
            victim = second_server if generation_node == server.address else server
            victim.kill()

            # Twice: a failed node must keep failing, never fall back to a default value (as pymemcache's
            # HashClient does within its retry window) or to another node.
            for _ in range(2):
                outcomes = {"raised": 0, "answered": 0}
                for key, customer in zip(keys, customers, strict=True):
                    try:
                        assert await store.state(key) is MessageState.DONE
                        assert await store.begin(key, owner="x", lease_s=30) is False
                        assert await store.get_conversation(customer) == Conversation(key.msgid, 1.0, 1.0, 1)
                        outcomes["answered"] += 1
                    except StoreUnavailable:
                        outcomes["raised"] += 1
                assert outcomes["raised"] > 0 and outcomes["answered"] > 0
            assert await store.ping() is False
        finally:
            await store.aclose()


@pytest.mark.anyio
@pytest.mark.memcached
async def test_many_customers_recording_and_removing_at_once_never_exhaust_cas(
    server: MemcachedProcess,
) -> None:
    """One index key per kf account must not become a hot spot: a busy shop drains 100 customers at once."""
    # About CAS contention, not timeouts: 200 commands at once on a loaded machine may take longer than FAST's
    # 0.5 s per command, which would fail the test with a timeout that says nothing about contention.
    patient = {"connect_timeout": 10, "timeout": 10}
    stores = [MemcachedStateStore(servers=[server.server], prefix="contended", **patient) for _ in range(2)]
    try:

        async def customer(i: int) -> None:
            store = stores[i % 2]
            who = CustomerRef(KF, f"wm{i}")
            for turn in range(5):
                msg = InboundMessage(
                    msgid=f"m{i}-{turn}",
                    open_kfid=KF,
                    external_userid=who.external_userid,
                    send_time=1_700_000_000 + turn,
                    origin=Origin.CUSTOMER,
                    msgtype="text",
                    text="hi",
                )
                await store.record([msg])
                assert [m.msgid for m in await store.pending(who)] == [msg.msgid]
                await store.remove(who, msg.msgid)

        await asyncio.gather(*(customer(i) for i in range(100)))
        assert await stores[0].customers_with_pending(KF) == []
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.anyio
@pytest.mark.memcached
async def test_a_scan_between_indexing_and_writing_an_inbox_does_not_lose_the_customer(
    server: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """record() indexes new customers, then writes their inboxes. Another instance's scan in between sees the
    inbox still empty and prunes the customer from the index; found in a two-instance burst, where 60
    customers were never answered. The customer must still be listed once record() returns."""
    shared = prefix()
    puller = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
    scanner = MemcachedStateStore(servers=[server.server], prefix=shared, **FAST)
    seen_by_scan: list[list[CustomerRef]] = []
    store_then_get = puller._client.store_then_get  # noqa: SLF001  (the inbox writes of record())

    async def scan_then_store(commands: Any, keys: Any) -> Any:
        seen_by_scan.append(await scanner.customers_with_pending(KF))  # lands in the window
        return await store_then_get(commands, keys)

    monkeypatch.setattr(puller._client, "store_then_get", scan_then_store)  # noqa: SLF001
    try:
        await puller.record([message("m1")])
        assert seen_by_scan == [[]]  # the scan saw an empty inbox (and pruned the index)
        assert await scanner.customers_with_pending(KF) == [ALICE]
        assert [m.msgid for m in await scanner.pending(ALICE)] == ["m1"]
    finally:
        await puller.aclose()
        await scanner.aclose()
