"""The rate limiter, the session-owner cache and the refusals over the store's shared roles: shared when the
store is given, as before without it, and never blocked by a store that fails."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from adapters.outbound.memory_store import MemoryStateStore
from application.errors import StoreUnavailable
from application.rate_limiter import CustomerRateLimiter
from application.rejections import RejectedCustomers
from application.session_state import SessionStates
from application.telemetry import Telemetry
from domain.messages import CustomerRef
from domain.rate_limit import RateDecision, RateLimit
from domain.session import SessionState
from tests.support.containers import FakeClock

pytestmark = pytest.mark.anyio

ALICE = CustomerRef("wkShared", "wmAlice")
ALLOW, NOTIFY, DROP = RateDecision.ALLOW, RateDecision.NOTIFY, RateDecision.DROP


class BrokenStore:
    """Counters and notes on a store that is down."""

    async def increment(self, customer: CustomerRef, counter: str, *, ttl_s: float) -> int:
        raise StoreUnavailable("down")

    async def decrement(self, customer: CustomerRef, counter: str) -> None:
        raise StoreUnavailable("down")

    async def counts(self, customer: CustomerRef, counters: Sequence[str]) -> list[int]:
        raise StoreUnavailable("down")

    async def put_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> None:
        raise StoreUnavailable("down")

    async def add_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> bool:
        raise StoreUnavailable("down")

    async def get_notes(self, customer: CustomerRef, topics: Sequence[str]) -> dict[str, str]:
        raise StoreUnavailable("down")

    async def delete_note(self, customer: CustomerRef, topic: str) -> None:
        raise StoreUnavailable("down")


def limiter(
    clock: FakeClock, store: MemoryStateStore | BrokenStore | None, limit: int = 3
) -> CustomerRateLimiter:
    return CustomerRateLimiter(
        rule=RateLimit(limit=limit, window_s=60), clock=clock, counters=store, notes=store
    )


async def test_two_limiters_on_one_store_allow_the_limit_once_with_one_notice() -> None:
    clock = FakeClock(start=6_000.0)
    store = MemoryStateStore(clock=clock.now)
    first, second = limiter(clock, store), limiter(clock, store)
    decisions = [await (first if n % 2 else second).admit(ALICE) for n in range(6)]
    assert decisions == [ALLOW, ALLOW, ALLOW, NOTIFY, DROP, DROP]


async def test_the_previous_slot_still_counts_for_the_part_of_it_inside_the_window() -> None:
    clock = FakeClock(start=6_000.0 + 50)  # slot 100 starts at 6000 s
    store = MemoryStateStore(clock=clock.now)
    shared = limiter(clock, store)
    assert [await shared.admit(ALICE) for _ in range(3)] == [ALLOW, ALLOW, ALLOW]
    clock.advance(15)  # 5 s into the next slot: 3 × 55/60 of the previous one is still inside
    assert await shared.admit(ALICE) is NOTIFY
    clock.advance(30)  # 35 s in: 3 × 25/60 = 1.25 still inside, room for one (the notice went out already)
    assert [await shared.admit(ALICE) for _ in range(2)] == [ALLOW, DROP]
    clock.advance(120)  # two windows on: nothing of it is inside any more
    assert [await shared.admit(ALICE) for _ in range(4)] == [ALLOW, ALLOW, ALLOW, NOTIFY]


async def test_without_shared_counters_the_exact_sliding_window_applies() -> None:
    clock = FakeClock(start=6_000.0)
    local = limiter(clock, None)
    assert not local.shared
    assert [await local.admit(ALICE) for _ in range(4)] == [ALLOW, ALLOW, ALLOW, NOTIFY]
    clock.advance(61)
    assert await local.admit(ALICE) is ALLOW


async def test_a_failing_store_falls_back_to_this_instances_windows() -> None:
    failing = limiter(FakeClock(start=6_000.0), BrokenStore())
    assert [await failing.admit(ALICE) for _ in range(5)] == [ALLOW, ALLOW, ALLOW, NOTIFY, DROP]


def sessions(world: KfWorld, clock: FakeClock, store: MemoryStateStore | BrokenStore | None) -> SessionStates:
    return SessionStates(channel=FakeKfChannel(world), clock=clock, telemetry=Telemetry(), notes=store)


async def test_a_session_owner_learned_elsewhere_is_seen_after_the_local_copy_ages() -> None:
    world, clock, store = KfWorld(), FakeClock(), MemoryStateStore()
    here, there = sessions(world, clock, store), sessions(world, clock, store)
    here.learn(ALICE, SessionState.BOT)
    assert here.writer is not None
    await here.writer.flush()
    assert (await there._shared(ALICE)) is not None  # noqa: SLF001
    there.learn(ALICE, SessionState.HUMAN, servicer_userid="lisi")
    assert there.writer is not None
    await there.writer.flush()
    local = await here._shared(ALICE)  # noqa: SLF001  (checked less than 2 s ago: its own copy)
    assert local is not None and local.state is SessionState.BOT
    clock.advance(2.5)
    seen = await here._shared(ALICE)  # noqa: SLF001
    assert seen is not None and seen.state is SessionState.HUMAN and seen.servicer_userid == "lisi"


async def test_a_failing_store_leaves_the_session_cache_local() -> None:
    world, clock = KfWorld(), FakeClock()
    cache = sessions(world, clock, BrokenStore())
    cache.learn(ALICE, SessionState.HUMAN)
    assert cache.writer is not None
    await cache.writer.flush()  # the write fails, logged, not raised
    known = await cache._shared(ALICE)  # noqa: SLF001
    assert known is not None and known.state is SessionState.HUMAN


async def test_refusals_are_shared_lifted_for_all_and_local_when_the_store_fails() -> None:
    clock, store = FakeClock(start=1_000.0), MemoryStateStore()
    here = RejectedCustomers(clock=clock, notes=store)
    there = RejectedCustomers(clock=clock, notes=store)
    here.remember(ALICE, at=900.0)
    assert here.writer is not None
    await here.writer.flush()
    assert await there.refusing(ALICE)
    assert not await there.refusing(ALICE, message_time=950.0)  # they wrote after refusing
    assert there.writer is not None
    await there.writer.flush()
    clock.advance(3)
    assert not await here.refusing(ALICE)

    broken = RejectedCustomers(clock=clock, notes=BrokenStore())
    broken.remember(ALICE, at=900.0)
    assert broken.writer is not None
    await broken.writer.flush()
    assert await broken.refusing(ALICE)
