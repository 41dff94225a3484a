"""The in-process store's memory bound: what it drops first, and what it never drops."""

from __future__ import annotations

import pytest

from adapters.outbound.memory_store import MemoryStateStore
from application.ports import MessageState
from domain.conversation import Conversation
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, Origin

pytestmark = pytest.mark.anyio
KF = "wkMem"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def key(name: str) -> DedupeKey:
    return DedupeKey(KF, name)


def pending_message(msgid: str, user: str) -> InboundMessage:
    return InboundMessage(msgid, KF, user, 1, Origin.CUSTOMER, "text", text=msgid)


async def test_expired_entries_go_before_live_ones() -> None:
    clock = Clock()
    store = MemoryStateStore(max_keys=3, clock=clock)
    await store.finish(key("m1"))
    await store.finish(key("m2"))
    assert await store.begin(key("lease"), owner="dead", lease_s=1)
    clock.now += 2
    await store.finish(key("m4"))
    assert await store.states([key("m1"), key("m2"), key("m4")]) == [MessageState.DONE] * 3
    assert store.size == 3


async def test_reading_a_mark_keeps_it() -> None:
    store = MemoryStateStore(max_keys=3)
    for name in ("m1", "m2", "m3"):
        await store.finish(key(name))
    assert await store.state(key("m1")) is MessageState.DONE
    await store.finish(key("m4"))
    assert await store.state(key("m2")) is MessageState.NEW
    assert await store.states([key("m1"), key("m3"), key("m4")]) == [MessageState.DONE] * 3


async def test_a_drained_customer_leaves_no_inbox_behind_and_clear_keeps_only_marks() -> None:
    store = MemoryStateStore(max_keys=10)
    alice = CustomerRef(KF, "wmA")
    await store.record([pending_message("p1", "wmA"), pending_message("p2", "wmA")])
    await store.put_conversation(alice, Conversation("c", 1.0, 1.0, 1))
    assert store.size == 3
    assert await store.complete(pending_message("p1", "wmA")) == [pending_message("p2", "wmA")]
    await store.remove(alice, "p2")
    assert store.size == 2  # the conversation and p1's mark
    await store.record([pending_message("p3", "wmA")])
    await store.set_cursor(KF, "cursor")
    await store.clear()
    assert store.size == 1
    assert await store.state(key("p1")) is MessageState.DONE
    assert await store.get_cursor(KF) is None


def test_a_store_without_room_is_refused() -> None:
    with pytest.raises(ValueError):
        MemoryStateStore(max_keys=0)
