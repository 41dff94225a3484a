"""Degraded mode: the bot keeps answering (once per message) while the shared store is unreachable."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest

from adapters.outbound.memcached_store import MemcachedStateStore
from adapters.outbound.memory_store import MemoryStateStore
from application.errors import StoreUnavailable
from application.failover_store import FailoverStateStore
from application.ports import MessageState, StateStore
from domain.conversation import Conversation
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, Origin
from tests.support.memcached import MemcachedProcess, start_memcached

pytestmark = pytest.mark.anyio

KF = "wkKF0001"
ALICE = CustomerRef(KF, "wmAlice")
BOB = CustomerRef(KF, "wmBob")
RETRY_S = 5.0
LOGGER = "application.failover_store"


class SwitchableStore:
    """A shared store that can be taken down: a MemoryStateStore whose every call raises while `down`."""

    backend = "memcached"

    def __init__(self) -> None:
        self.inner = MemoryStateStore()
        self.down = False
        self.ping_passes_while_down = False  # a half-up store: pings pass, every other call fails
        self.calls = 0

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.down:
                raise StoreUnavailable("memcached unreachable (ConnectionRefusedError)")
            return await method(*args, **kwargs)

        return call

    async def ping(self) -> bool:
        self.calls += 1
        return not self.down or self.ping_passes_while_down


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(msgid: str, *, customer: CustomerRef = ALICE, send_time: int = 100) -> InboundMessage:
    return InboundMessage(
        msgid, customer.open_kfid, customer.external_userid, send_time, Origin.CUSTOMER, "text", text=msgid
    )


@pytest.fixture
def primary() -> SwitchableStore:
    return SwitchableStore()


@pytest.fixture
def fallback() -> MemoryStateStore:
    return MemoryStateStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(primary: SwitchableStore, fallback: MemoryStateStore, clock: Clock) -> FailoverStateStore:
    return FailoverStateStore(cast(StateStore, primary), fallback, retry_interval_s=RETRY_S, clock=clock)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]


async def outage_of_many_operations(store: FailoverStateStore) -> None:
    for i in range(10):
        key = DedupeKey(KF, f"m{i}")
        await store.record([message(f"m{i}")])
        assert await store.state(key) is MessageState.NEW
        assert await store.begin(key, owner="me", lease_s=30) is True
        await store.finish(key)
        await store.remove(ALICE, f"m{i}")
        await store.set_cursor(KF, f"cursor-{i}")


class TestNormalMode:
    async def test_everything_goes_to_the_primary(
        self, store: FailoverStateStore, primary: SwitchableStore
    ) -> None:
        key = DedupeKey(KF, "m1")
        assert await store.begin(key, owner="me", lease_s=30)
        await store.finish(key)
        await store.put_conversation(ALICE, Conversation("c", 1.0, 1.0, 1))
        await store.record([message("m2")])
        await store.set_cursor(KF, "cur")
        assert await primary.inner.state(key) is MessageState.DONE
        assert await primary.inner.get_conversation(ALICE) == Conversation("c", 1.0, 1.0, 1)
        assert [m.msgid for m in await primary.inner.pending(ALICE)] == ["m2"]
        assert await primary.inner.get_cursor(KF) == "cur"
        assert not store.degraded and store.outages == 0

    async def test_it_reports_the_primarys_backend(self, store: FailoverStateStore) -> None:
        assert store.backend == "memcached"


class TestOutage:
    async def test_one_warning_per_outage_not_one_per_message(
        self, store: FailoverStateStore, primary: SwitchableStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        primary.down = True
        await outage_of_many_operations(store)
        assert store.degraded and store.outages == 1
        assert len(warnings(caplog)) == 1
        assert warnings(caplog)[0].startswith("state store unreachable; degraded mode:")

    async def test_operations_keep_working_and_never_raise(
        self, store: FailoverStateStore, primary: SwitchableStore
    ) -> None:
        primary.down = True
        key = DedupeKey(KF, "m1")
        assert await store.begin(key, owner="me", lease_s=30) is True
        assert await store.begin(key, owner="other", lease_s=30) is False
        assert await store.renew(key, owner="me", lease_s=30) is True
        await store.finish(key)
        assert await store.state(key) is MessageState.DONE
        await store.put_conversation(ALICE, Conversation("c", 1.0, 1.0, 1))
        assert await store.get_conversation(ALICE) == Conversation("c", 1.0, 1.0, 1)
        assert await store.delete_conversation(ALICE) is True
        await store.record([message("m2")])
        assert [m.msgid for m in await store.pending(ALICE)] == ["m2"]
        assert await store.customers_with_pending(KF) == [ALICE]
        await store.set_cursor(KF, "cur")
        assert await store.get_cursor(KF) == "cur"
        assert await store.acquire_pull(KF, owner="me", lease_s=30) is True
        assert await store.acquire_pull(KF, owner="other", lease_s=30) is False
        assert await store.renew_pull(KF, owner="me", lease_s=30) is True
        await store.release_pull(KF, owner="me")
        await store.request_pull(KF, "tok")
        assert await store.pull_requests(KF) == (1, "tok")
        await store.remember_kf(KF)
        assert await store.known_kfs() == [KF]
        assert await store.ping() is False
        await store.clear()

    async def test_the_primary_is_left_alone_until_the_retry_interval_passed(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        primary.down = True
        await store.state(DedupeKey(KF, "m1"))
        calls = primary.calls
        clock.now += RETRY_S - 0.1
        await outage_of_many_operations(store)
        assert primary.calls == calls

    async def test_a_failed_probe_waits_another_interval_without_a_new_warning(
        self,
        store: FailoverStateStore,
        primary: SwitchableStore,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        primary.down = True
        await store.state(DedupeKey(KF, "m1"))
        clock.now += RETRY_S
        calls = primary.calls
        await store.state(DedupeKey(KF, "m1"))
        assert primary.calls == calls + 1  # one ping, nothing else
        await store.state(DedupeKey(KF, "m1"))
        assert primary.calls == calls + 1
        assert store.degraded and len(warnings(caplog)) == 1 and infos(caplog) == []

    async def test_a_pull_started_during_the_outage_still_excludes_other_pulls(
        self, store: FailoverStateStore, primary: SwitchableStore
    ) -> None:
        primary.down = True
        assert await store.acquire_pull(KF, owner="me", lease_s=30) is True
        assert await store.acquire_pull(KF, owner="me-too", lease_s=30) is False


class TestRecovery:
    async def go_down(self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock) -> None:
        """Take the primary down; the next operation notices."""
        primary.down = True
        await store.state(DedupeKey(KF, "probe"))
        assert store.degraded

    async def recover(self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock) -> None:
        primary.down = False
        clock.now += RETRY_S
        await store.known_kfs()  # any operation probes
        assert not store.degraded

    async def test_recovery_is_logged_once_with_the_outage_length(
        self,
        store: FailoverStateStore,
        primary: SwitchableStore,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        await self.go_down(store, primary, clock)
        clock.now += 37
        await self.recover(store, primary, clock)
        await outage_of_many_operations(store)
        assert infos(caplog) == ["state store reachable again after 42 s"]
        assert len(warnings(caplog)) == 1

    async def test_a_second_outage_warns_again(
        self,
        store: FailoverStateStore,
        primary: SwitchableStore,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        for _ in range(2):
            await self.go_down(store, primary, clock)
            await self.recover(store, primary, clock)
        assert store.outages == 2
        assert len(warnings(caplog)) == 2 and len(infos(caplog)) == 2

    async def test_a_message_done_during_the_outage_is_not_new_afterwards(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        key = DedupeKey(KF, "m1")
        await self.go_down(store, primary, clock)
        assert await store.begin(key, owner="me", lease_s=30)
        await store.finish(key)
        await self.recover(store, primary, clock)
        assert await store.state(key) is MessageState.DONE
        assert await store.begin(key, owner="me", lease_s=30) is False
        # Written through, so other instances know too.
        assert await primary.inner.state(key) is MessageState.DONE

    async def test_a_message_begun_during_the_outage_stays_busy_and_its_lease_moves_to_the_primary(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        key = DedupeKey(KF, "m1")
        await self.go_down(store, primary, clock)
        assert await store.begin(key, owner="me", lease_s=30)
        await self.recover(store, primary, clock)
        assert await store.state(key) is MessageState.BUSY
        assert await store.begin(key, owner="other", lease_s=30) is False
        assert await store.renew(key, owner="me", lease_s=30) is True
        assert await primary.inner.state(key) is MessageState.BUSY
        await store.finish(key)
        assert await store.state(key) is MessageState.DONE

    async def test_a_lease_taken_elsewhere_meanwhile_is_not_renewed(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        key = DedupeKey(KF, "m1")
        await self.go_down(store, primary, clock)
        assert await store.begin(key, owner="me", lease_s=30)
        await primary.inner.finish(key)  # another instance, which could still reach memcached, answered it
        await self.recover(store, primary, clock)
        assert await store.state(key) is MessageState.DONE
        assert await store.renew(key, owner="me", lease_s=30) is False

    async def test_a_released_message_is_new_again(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        key = DedupeKey(KF, "m1")
        await self.go_down(store, primary, clock)
        assert await store.begin(key, owner="me", lease_s=30)
        await self.recover(store, primary, clock)
        await store.release(key, owner="me")
        assert await store.state(key) is MessageState.NEW
        assert await store.begin(key, owner="other", lease_s=30) is True

    async def test_the_cursor_written_during_the_outage_is_kept(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await store.set_cursor(KF, "before")
        await self.go_down(store, primary, clock)
        assert await store.get_cursor(KF) == "before"  # mirrored: the outage resumes where we were
        await store.set_cursor(KF, "during")
        await self.recover(store, primary, clock)
        assert await store.get_cursor(KF) == "during"
        assert await primary.inner.get_cursor(KF) == "during"

    async def test_conversations_of_the_outage_are_kept(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await store.put_conversation(BOB, Conversation("bob-old", 1.0, 1.0, 1))
        await self.go_down(store, primary, clock)
        await store.put_conversation(ALICE, Conversation("alice-new", 1.0, 1.0, 1))
        assert await store.delete_conversation(BOB) is False  # only the shared store knew it
        await self.recover(store, primary, clock)
        assert await store.get_conversation(ALICE) == Conversation("alice-new", 1.0, 1.0, 1)
        assert await primary.inner.get_conversation(ALICE) == Conversation("alice-new", 1.0, 1.0, 1)
        assert await store.get_conversation(BOB) is None  # the reset during the outage holds

    async def test_the_inbox_of_both_stores_is_merged(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await store.record([message("m1", send_time=1), message("m3", send_time=3)])
        await self.go_down(store, primary, clock)
        await store.record([message("m2", send_time=2), message("m3", send_time=3)])
        await store.record([message("b1", customer=BOB)])
        await self.recover(store, primary, clock)
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1", "m2", "m3"]
        assert set(await store.customers_with_pending(KF)) == {ALICE, BOB}
        for msgid in ("m1", "m2", "m3"):
            await store.remove(ALICE, msgid)
        assert await store.pending(ALICE) == []
        assert await store.customers_with_pending(KF) == [BOB]

    async def test_removals_and_completions_return_the_merged_inbox(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        first, second, third = (message(f"m{i}", send_time=i) for i in (1, 2, 3))
        await store.record([first, third])
        await self.go_down(store, primary, clock)
        await store.record([second, third])
        await self.recover(store, primary, clock)
        assert await store.remove(ALICE, "m1") == [second, third]
        assert await store.complete(second) == [third]
        assert await store.complete(third) == []
        assert await store.pending(ALICE) == []
        for done in (second, third):
            assert await primary.inner.state(DedupeKey.for_message(done)) is MessageState.DONE

    async def test_a_message_completed_during_the_outage_is_done_everywhere_afterwards(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        m1, m2 = message("m1", send_time=1), message("m2", send_time=2)
        await store.record([m1, m2])
        await self.go_down(store, primary, clock)
        assert await store.begin(DedupeKey.for_message(m1), owner="me", lease_s=30)
        assert await store.complete(m1) == []  # the fallback's inbox: what the primary holds is out of reach
        await self.recover(store, primary, clock)
        assert await primary.inner.state(DedupeKey.for_message(m1)) is MessageState.DONE  # written through
        assert await store.states([DedupeKey.for_message(m) for m in (m1, m2)]) == [
            MessageState.DONE,
            MessageState.NEW,
        ]

    async def test_a_claim_sees_what_the_outage_did_like_begin(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        done, held, free = message("done"), message("held"), message("free")
        await self.go_down(store, primary, clock)
        assert await store.claim(done, owner="me", lease_s=30)
        await store.finish(DedupeKey.for_message(done))
        assert await store.claim(held, owner="me", lease_s=30)
        await self.recover(store, primary, clock)
        assert await store.claim(done, owner="other", lease_s=30) is False
        assert await store.claim(held, owner="other", lease_s=30) is False
        assert await store.claim(free, owner="other", lease_s=30) is True
        assert await primary.inner.state(DedupeKey.for_message(free)) is MessageState.BUSY

    async def test_states_sees_what_the_outage_did_like_state(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        done, busy, new = DedupeKey(KF, "done"), DedupeKey(KF, "busy"), DedupeKey(KF, "new")
        await self.go_down(store, primary, clock)
        assert await store.begin(busy, owner="me", lease_s=30)
        await store.finish(done)
        assert await store.states([done, busy, new]) == [
            MessageState.DONE,
            MessageState.BUSY,
            MessageState.NEW,
        ]
        await self.recover(store, primary, clock)
        await primary.inner.begin(new, owner="other", lease_s=30)
        expected = [MessageState.DONE, MessageState.BUSY, MessageState.BUSY]
        assert await store.states([done, busy, new]) == expected
        assert [await store.state(key) for key in (done, busy, new)] == expected

    async def test_kfs_learnt_during_the_outage_are_kept(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await store.remember_kf("wkA")
        await self.go_down(store, primary, clock)
        assert await store.known_kfs() == ["wkA"]
        await store.remember_kf("wkB")
        await self.recover(store, primary, clock)
        assert await store.known_kfs() == ["wkA", "wkB"]
        assert await primary.inner.known_kfs() == ["wkA", "wkB"]

    async def test_a_pull_lease_from_the_outage_still_excludes_a_new_pull(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await self.go_down(store, primary, clock)
        assert await store.acquire_pull(KF, owner="me", lease_s=30)
        await self.recover(store, primary, clock)
        assert await store.acquire_pull(KF, owner="me-too", lease_s=30) is False
        assert await store.renew_pull(KF, owner="me", lease_s=30) is True  # moved to the shared store
        assert await primary.inner.acquire_pull(KF, owner="elsewhere", lease_s=30) is False
        await store.release_pull(KF, owner="me")
        assert await store.acquire_pull(KF, owner="me-too", lease_s=30) is True

    async def test_a_clear_during_the_outage_reaches_the_primary(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await store.set_cursor(KF, "old")
        await store.put_conversation(ALICE, Conversation("old", 1.0, 1.0, 1))
        await self.go_down(store, primary, clock)
        await store.clear()
        await store.set_cursor("wkB", "new")
        await self.recover(store, primary, clock)
        assert await store.get_cursor(KF) is None
        assert await store.get_conversation(ALICE) is None
        assert await store.get_cursor("wkB") == "new"

    async def test_clear_clears_both_and_both_keep_their_done_marks(
        self, store: FailoverStateStore, primary: SwitchableStore, fallback: MemoryStateStore, clock: Clock
    ) -> None:
        await self.go_down(store, primary, clock)
        await store.finish(DedupeKey(KF, "m1"))
        await store.put_conversation(ALICE, Conversation("outage", 1.0, 1.0, 1))
        await self.recover(store, primary, clock)
        await store.put_conversation(BOB, Conversation("shared", 1.0, 1.0, 1))
        await store.clear()
        for side in (store, primary.inner, fallback):
            assert await side.get_conversation(ALICE) is None
            assert await side.get_conversation(BOB) is None
            assert await side.state(DedupeKey(KF, "m1")) is MessageState.DONE

    async def test_a_done_mark_of_the_outage_reaches_the_primary_despite_a_clear(
        self, store: FailoverStateStore, primary: SwitchableStore, clock: Clock
    ) -> None:
        await self.go_down(store, primary, clock)
        await store.finish(DedupeKey(KF, "m1"))
        await store.clear()
        await self.recover(store, primary, clock)
        assert await primary.inner.state(DedupeKey(KF, "m1")) is MessageState.DONE

    async def test_when_the_write_through_fails_it_stays_degraded(
        self,
        store: FailoverStateStore,
        primary: SwitchableStore,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        key = DedupeKey(KF, "m1")
        await self.go_down(store, primary, clock)
        await store.finish(key)
        primary.ping_passes_while_down = True
        clock.now += RETRY_S
        assert await store.state(key) is MessageState.DONE
        assert store.degraded and infos(caplog) == [] and len(warnings(caplog)) == 1
        await self.recover(store, primary, clock)
        assert await primary.inner.state(key) is MessageState.DONE


# --- with a real memcached that dies and comes back -----------------------------------------------------


@pytest.fixture
def server() -> Iterator[MemcachedProcess]:
    process = start_memcached()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
async def memcached(server: MemcachedProcess) -> AsyncIterator[MemcachedStateStore]:
    opened = MemcachedStateStore(
        servers=[server.server], prefix=f"failover-{uuid.uuid4().hex[:12]}", connect_timeout=0.5, timeout=0.5
    )
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.mark.memcached
class TestWithRealMemcached:
    async def test_a_memcached_crash_and_restart_is_ridden_out(
        self,
        server: MemcachedProcess,
        memcached: MemcachedStateStore,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        store = FailoverStateStore(memcached, MemoryStateStore(), retry_interval_s=RETRY_S, clock=clock)
        before, during = DedupeKey(KF, "before"), DedupeKey(KF, "during")
        await store.finish(before)
        await store.set_cursor(KF, "c1")

        server.kill()
        assert await store.begin(during, owner="me", lease_s=30) is True
        await store.finish(during)
        await store.set_cursor(KF, "c2")
        await store.record([message("m1")])
        assert await store.state(during) is MessageState.DONE
        assert store.degraded and len(warnings(caplog)) == 1

        server.restart()  # empty, as after a real crash
        clock.now += RETRY_S
        assert await store.state(during) is MessageState.DONE
        assert not store.degraded
        assert infos(caplog) == ["state store reachable again after 5 s"]
        assert await memcached.state(during) is MessageState.DONE  # written through
        assert await store.get_cursor(KF) == "c2"
        assert await memcached.get_cursor(KF) == "c2"
        assert [m.msgid for m in await store.pending(ALICE)] == ["m1"]
        assert await store.begin(during, owner="other", lease_s=30) is False

    async def test_a_hung_memcached_costs_one_timeout_then_none(
        self, server: MemcachedProcess, memcached: MemcachedStateStore, clock: Clock
    ) -> None:
        store = FailoverStateStore(memcached, MemoryStateStore(), retry_interval_s=RETRY_S, clock=clock)
        await store.finish(DedupeKey(KF, "warm-up"))
        outcomes: list[str] = []
        begin = memcached.begin

        async def counted_begin(key: DedupeKey, *, owner: str, lease_s: float) -> bool:
            try:
                won = await begin(key, owner=owner, lease_s=lease_s)
            except StoreUnavailable:
                outcomes.append("timeout")
                raise
            outcomes.append("answered")
            return won

        memcached.begin = counted_begin  # type: ignore[method-assign]
        server.pause()
        try:
            for i in range(20):
                assert await store.begin(DedupeKey(KF, f"m{i}"), owner="me", lease_s=30) is True
            # One command waited for the hung server (and timed out); the other 19 did not go to it at all.
            assert outcomes == ["timeout"]
        finally:
            server.resume()
