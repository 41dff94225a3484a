"""The contract of the roles the instances share about customers (application/ports.py): the rate limiter's
`CustomerCounters`, and the `CustomerNotes` the session-owner cache and the refusals use. Run against every
store of tests/contract/test_state_store.py (memory, memcached, memcached-2, failover,
failover-primary-down); on the shared backends `twin` is a second instance on the same namespace, so what
one counts or notes the other sees.
"""

from __future__ import annotations

import anyio
import pytest

from application.ports import CustomerCounters, CustomerNotes, StateStore
from domain.messages import CustomerRef
from tests.contract import test_state_store as suite
from tests.contract.test_state_store import ALICE, BOB, WEIRD_IDS, Elapse

# The store fixtures of the state store suite (every backend, twin, neighbour, expiry), used here as they are.
backend = suite.backend
clock = suite.clock
elapse = suite.elapse
neighbour = suite.neighbour
store = suite.store
twin = suite.twin

pytestmark = pytest.mark.anyio

OTHER_KF_ALICE = CustomerRef("wkKF0002", ALICE.external_userid)


class TestCustomerCounters:
    async def test_increment_counts_up_from_one(self, store: CustomerCounters) -> None:
        assert [await store.increment(ALICE, "w1", ttl_s=60) for _ in range(3)] == [1, 2, 3]
        assert await store.counts(ALICE, ["w1"]) == [3]

    async def test_counters_are_per_customer_kf_account_and_name(self, store: CustomerCounters) -> None:
        await store.increment(ALICE, "w1", ttl_s=60)
        await store.increment(ALICE, "w1", ttl_s=60)
        await store.increment(BOB, "w1", ttl_s=60)
        await store.increment(ALICE, "w2", ttl_s=60)
        assert await store.counts(ALICE, ["w1", "w2", "w3"]) == [2, 1, 0]
        assert await store.counts(BOB, ["w1", "w2"]) == [1, 0]
        assert await store.counts(OTHER_KF_ALICE, ["w1"]) == [0]

    async def test_decrement_takes_one_back_never_below_zero(self, store: CustomerCounters) -> None:
        await store.increment(ALICE, "w", ttl_s=60)
        await store.increment(ALICE, "w", ttl_s=60)
        await store.decrement(ALICE, "w")
        assert await store.counts(ALICE, ["w"]) == [1]
        await store.decrement(ALICE, "w")
        await store.decrement(ALICE, "w")
        assert await store.counts(ALICE, ["w"]) == [0]
        await store.decrement(BOB, "never")  # harmless when absent
        assert await store.counts(BOB, ["never"]) == [0]

    async def test_concurrent_increments_each_get_their_own_count(
        self, store: CustomerCounters, twin: CustomerCounters
    ) -> None:
        seen: list[int] = []

        async def bump(on: CustomerCounters) -> None:
            seen.append(await on.increment(ALICE, "w", ttl_s=60))

        async with anyio.create_task_group() as group:
            for index in range(20):
                group.start_soon(bump, store if index % 2 else twin)
        assert sorted(seen) == list(range(1, 21))
        assert await store.counts(ALICE, ["w"]) == [20]
        assert await twin.counts(ALICE, ["w"]) == [20]

    async def test_a_counter_expires_ttl_after_it_was_created(
        self, store: CustomerCounters, elapse: Elapse
    ) -> None:
        await store.increment(ALICE, "w", ttl_s=2)
        await store.increment(ALICE, "w", ttl_s=2)  # does not extend it
        await elapse(2)
        assert await store.counts(ALICE, ["w"]) == [0]
        assert await store.increment(ALICE, "w", ttl_s=2) == 1

    @pytest.mark.parametrize("userid", WEIRD_IDS)
    async def test_any_ids_and_names(self, store: CustomerCounters, userid: str) -> None:
        customer = CustomerRef("wkKF0001", userid)
        assert await store.increment(customer, "窗口 1:x", ttl_s=60) == 1
        assert await store.counts(customer, ["窗口 1:x"]) == [1]


class TestCustomerNotes:
    async def test_a_note_is_read_back_and_overwritten(self, store: CustomerNotes) -> None:
        await store.put_note(ALICE, "session", "bot", ttl_s=60)
        assert await store.get_notes(ALICE, ["session", "refused"]) == {"session": "bot"}
        await store.put_note(ALICE, "session", "human", ttl_s=60)
        assert await store.get_notes(ALICE, ["session"]) == {"session": "human"}

    async def test_notes_are_per_customer_and_topic(self, store: CustomerNotes) -> None:
        await store.put_note(ALICE, "session", "a", ttl_s=60)
        await store.put_note(ALICE, "refused", "b", ttl_s=60)
        await store.put_note(BOB, "session", "c", ttl_s=60)
        assert await store.get_notes(ALICE, ["session", "refused"]) == {"session": "a", "refused": "b"}
        assert await store.get_notes(BOB, ["session", "refused"]) == {"session": "c"}
        assert await store.get_notes(OTHER_KF_ALICE, ["session"]) == {}

    async def test_add_note_wins_once(self, store: CustomerNotes, twin: CustomerNotes) -> None:
        won: list[bool] = []

        async def add(on: CustomerNotes, value: str) -> None:
            won.append(await on.add_note(ALICE, "notice", value, ttl_s=60))

        async with anyio.create_task_group() as group:
            for index in range(10):
                group.start_soon(add, store if index % 2 else twin, str(index))
        assert won.count(True) == 1
        assert (await twin.get_notes(ALICE, ["notice"])).keys() == {"notice"}

    async def test_delete_forgets_a_note_and_is_harmless_when_absent(self, store: CustomerNotes) -> None:
        await store.put_note(ALICE, "refused", "x", ttl_s=60)
        await store.delete_note(ALICE, "refused")
        await store.delete_note(ALICE, "refused")
        assert await store.get_notes(ALICE, ["refused"]) == {}
        assert await store.add_note(ALICE, "refused", "y", ttl_s=60)

    async def test_a_note_expires_after_its_ttl(self, store: CustomerNotes, elapse: Elapse) -> None:
        await store.put_note(ALICE, "session", "bot", ttl_s=1)
        await store.put_note(ALICE, "refused", "x", ttl_s=60)
        await elapse(1)
        assert await store.get_notes(ALICE, ["session", "refused"]) == {"refused": "x"}
        assert await store.add_note(ALICE, "session", "again", ttl_s=60)

    async def test_what_one_instance_notes_the_other_reads(
        self, store: CustomerNotes, twin: CustomerNotes
    ) -> None:
        await store.put_note(ALICE, "session", "human", ttl_s=60)
        assert await twin.get_notes(ALICE, ["session"]) == {"session": "human"}
        await twin.delete_note(ALICE, "session")
        assert await store.get_notes(ALICE, ["session"]) == {}

    @pytest.mark.parametrize("value", ["", "客服 小王\n", "x" * 2000, '{"s":1}'])
    async def test_any_value(self, store: CustomerNotes, value: str) -> None:
        customer = CustomerRef("wkKF0001", "客户 张三")
        await store.put_note(customer, "话题", value, ttl_s=60)
        assert await store.get_notes(customer, ["话题"]) == {"话题": value}


class TestClearAndNamespaces:
    async def test_clear_forgets_notes_and_counters(self, store: StateStore) -> None:
        await store.put_note(ALICE, "session", "bot", ttl_s=60)
        await store.increment(ALICE, "w", ttl_s=60)
        await store.clear()
        assert await store.get_notes(ALICE, ["session"]) == {}
        assert await store.counts(ALICE, ["w"]) == [0]

    async def test_another_namespace_is_left_alone(self, store: StateStore, neighbour: StateStore) -> None:
        await store.put_note(ALICE, "session", "bot", ttl_s=60)
        await store.increment(ALICE, "w", ttl_s=60)
        assert await neighbour.get_notes(ALICE, ["session"]) == {}
        assert await neighbour.counts(ALICE, ["w"]) == [0]
        await neighbour.clear()
        assert await store.get_notes(ALICE, ["session"]) == {"session": "bot"}
        assert await store.counts(ALICE, ["w"]) == [1]
