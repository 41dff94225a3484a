"""Degraded mode: keep answering from this instance's own memory while the shared state store is unreachable.

`FailoverStateStore(primary, fallback)` wraps the shared store (Memcached) and an in-process one
(`MemoryStateStore`). It never raises `StoreUnavailable`.

Normal mode
    Every operation goes to the primary. The fallback only mirrors what this instance needs to carry on
    through an outage: cursors and known kf accounts.

Entering degraded mode
    The first `StoreUnavailable` from the primary switches to degraded mode and logs ONE warning
    ("state store unreachable; degraded mode: ..."), not one per message. That operation and every following
    one are served by the fallback, and the primary is not touched for `retry_interval_s`.

Degraded mode
    Dedupe marks, leases, the inbox, cursors, conversations, pull leases and counters live in the fallback,
    so this instance still never answers one message twice and still runs one pull per kf account at a time.
    Other instances cannot see this instance's state: if they can still reach the primary, a message may be
    answered by them and by us (that is the price of answering at all rather than going silent).

Recovery
    Once `retry_interval_s` has passed, the next operation probes the primary with `ping()`. When it answers,
    what was written during the outage is written through -- a `clear()`, known kf accounts, cursors, DONE
    marks, conversations (then dropped from the fallback) -- and ONE info line is logged ("state store
    reachable again after N s"). If the probe or the write-through fails, degraded mode goes on for another
    interval (no new warning). While the probe runs, other operations keep using the fallback.

After recovery the fallback is still consulted, so nothing done during the outage is forgotten:
    - `state()`/`states()`/`begin()`/`claim()`: a msgid DONE or BUSY in the fallback is not NEW;
    - `renew()`/`renew_pull()`: a lease taken in the fallback is moved to the primary (False if the primary
      has meanwhile given it to someone else); `release*()` releases in both;
    - `acquire_pull()` also takes the fallback's lease, so a pull started during the outage and one started
      after it never overlap within this instance;
    - `get_conversation()` returns the fallback's value when the primary has none;
    - `get_cursor()` prefers a cursor written during the outage that is not yet written through;
    - `pending()` and `customers_with_pending()` merge both (deduplicated by msgid / customer), `remove()`
      and `complete()` remove from both (and return both's remaining messages), `known_kfs()` merges both;
    - notes and counters (rate windows, session owners, refusals) are served by whichever store answers and
      never written through: during an outage each instance counts and notes for itself;
    - `clear()` clears both (each keeps its message marks, leases and pull leases: `StoreAdmin.clear`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import TypeVar

from application.errors import StoreUnavailable
from application.failover_mode import FailoverMode
from application.ports import MessageState
from domain.conversation import Conversation
from domain.customer import CustomerProfile
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger(__name__)

T = TypeVar("T")


class FailoverStateStore(FailoverMode):
    """A StateStore that falls back to an in-process store while the shared one is unreachable."""

    # --- ConversationStore ----------------------------------------------------------------------------

    async def get_conversation(self, customer: CustomerRef) -> Conversation | None:
        async def on_primary() -> Conversation | None:
            found = await self._primary.get_conversation(customer)
            return found if found is not None else await self._fallback.get_conversation(customer)

        return await self._route(on_primary, lambda: self._fallback.get_conversation(customer))

    async def put_conversation(self, customer: CustomerRef, conversation: Conversation) -> None:
        async def on_fallback() -> None:
            await self._fallback.put_conversation(customer, conversation)
            self._dirty_conversations[customer] = None

        await self._route(lambda: self._primary.put_conversation(customer, conversation), on_fallback)

    async def delete_conversation(self, customer: CustomerRef) -> bool:
        async def on_primary() -> bool:
            deleted = await self._primary.delete_conversation(customer)
            return await self._fallback.delete_conversation(customer) or deleted

        async def on_fallback() -> bool:
            self._dirty_conversations[customer] = None
            return await self._fallback.delete_conversation(customer)

        return await self._route(on_primary, on_fallback)

    # --- MessageLedger --------------------------------------------------------------------------------

    async def begin(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        async def on_primary() -> bool:
            if await self._fallback.state(key) is not MessageState.NEW:
                return False
            return await self._primary.begin(key, owner=owner, lease_s=lease_s)

        return await self._route(on_primary, lambda: self._fallback.begin(key, owner=owner, lease_s=lease_s))

    async def claim(self, message: InboundMessage, *, owner: str, lease_s: float) -> bool:
        key = DedupeKey.for_message(message)

        async def on_primary() -> bool:
            if await self._fallback.state(key) is not MessageState.NEW:
                return False
            return await self._primary.claim(message, owner=owner, lease_s=lease_s)

        return await self._route(
            on_primary, lambda: self._fallback.claim(message, owner=owner, lease_s=lease_s)
        )

    async def renew(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        async def on_primary() -> bool:
            if await self._primary.renew(key, owner=owner, lease_s=lease_s):
                await self._fallback.renew(key, owner=owner, lease_s=lease_s)
                return True
            if await self._fallback.renew(key, owner=owner, lease_s=lease_s):
                # Taken during the outage: move it to the shared store, unless someone got there first.
                return await self._primary.begin(key, owner=owner, lease_s=lease_s)
            return False

        return await self._route(on_primary, lambda: self._fallback.renew(key, owner=owner, lease_s=lease_s))

    async def finish(self, key: DedupeKey) -> None:
        async def on_primary() -> None:
            await self._primary.finish(key)
            if await self._fallback.state(key) is MessageState.BUSY:
                await self._fallback.finish(key)

        async def on_fallback() -> None:
            await self._fallback.finish(key)
            self._dirty_done[key] = None

        await self._route(on_primary, on_fallback)

    async def release(self, key: DedupeKey, *, owner: str) -> None:
        async def on_primary() -> None:
            await self._primary.release(key, owner=owner)
            await self._fallback.release(key, owner=owner)

        await self._route(on_primary, lambda: self._fallback.release(key, owner=owner))

    async def state(self, key: DedupeKey) -> MessageState:
        async def on_primary() -> MessageState:
            local = await self._fallback.state(key)
            if local is MessageState.DONE:
                return local
            shared = await self._primary.state(key)
            if shared is MessageState.NEW:
                return local
            return shared

        return await self._route(on_primary, lambda: self._fallback.state(key))

    async def states(self, keys: Sequence[DedupeKey]) -> list[MessageState]:
        async def on_primary() -> list[MessageState]:
            local = await self._fallback.states(keys)
            # Like state(): DONE here wins; otherwise the shared state, unless that one knows nothing.
            undecided = [i for i, found in enumerate(local) if found is not MessageState.DONE]
            if not undecided:
                return local
            shared = await self._primary.states([keys[i] for i in undecided])
            merged = list(local)
            for i, found in zip(undecided, shared, strict=True):
                if found is not MessageState.NEW:
                    merged[i] = found
            return merged

        return await self._route(on_primary, lambda: self._fallback.states(keys))

    # --- Inbox ----------------------------------------------------------------------------------------

    async def record(self, messages: Sequence[InboundMessage]) -> None:
        await self._route(lambda: self._primary.record(messages), lambda: self._fallback.record(messages))

    async def pending(self, customer: CustomerRef) -> list[InboundMessage]:
        async def on_primary() -> list[InboundMessage]:
            return _merged(await self._primary.pending(customer), await self._fallback.pending(customer))

        return await self._route(on_primary, lambda: self._fallback.pending(customer))

    async def remove(self, customer: CustomerRef, msgid: str) -> list[InboundMessage]:
        async def on_primary() -> list[InboundMessage]:
            shared = await self._primary.remove(customer, msgid)
            return _merged(shared, await self._fallback.remove(customer, msgid))

        return await self._route(on_primary, lambda: self._fallback.remove(customer, msgid))

    async def complete(self, message: InboundMessage) -> list[InboundMessage]:
        key = DedupeKey.for_message(message)

        async def on_primary() -> list[InboundMessage]:
            shared = await self._primary.complete(message)
            # As finish() and remove(): a lease taken here during an outage ends DONE here too.
            if await self._fallback.state(key) is MessageState.BUSY:
                await self._fallback.finish(key)
            return _merged(shared, await self._fallback.remove(message.customer, message.msgid))

        async def on_fallback() -> list[InboundMessage]:
            remaining = await self._fallback.complete(message)
            self._dirty_done[key] = None
            return remaining

        return await self._route(on_primary, on_fallback)

    async def customers_with_pending(
        self, open_kfid: str, *, unread: Collection[CustomerRef] = ()
    ) -> list[CustomerRef]:
        async def on_primary() -> list[CustomerRef]:
            shared = await self._primary.customers_with_pending(open_kfid, unread=unread)
            local = await self._fallback.customers_with_pending(open_kfid, unread=unread)
            return list(dict.fromkeys([*shared, *local]))

        return await self._route(
            on_primary, lambda: self._fallback.customers_with_pending(open_kfid, unread=unread)
        )

    # --- CursorStore ----------------------------------------------------------------------------------

    async def get_cursor(self, open_kfid: str) -> str | None:
        async def on_primary() -> str | None:
            if open_kfid in self._dirty_cursors:
                return await self._fallback.get_cursor(open_kfid)
            cursor = await self._primary.get_cursor(open_kfid)
            if cursor is not None:
                await self._fallback.set_cursor(open_kfid, cursor)  # where an outage would resume
            return cursor

        return await self._route(on_primary, lambda: self._fallback.get_cursor(open_kfid))

    async def set_cursor(self, open_kfid: str, cursor: str) -> None:
        async def on_primary() -> None:
            await self._primary.set_cursor(open_kfid, cursor)
            await self._fallback.set_cursor(open_kfid, cursor)

        async def on_fallback() -> None:
            await self._fallback.set_cursor(open_kfid, cursor)
            self._dirty_cursors[open_kfid] = None

        await self._route(on_primary, on_fallback)

    # --- PullCoordination -----------------------------------------------------------------------------

    async def acquire_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        async def on_primary() -> bool:
            # The fallback's lease too: a pull this instance started during the outage may still run.
            if not await self._fallback.acquire_pull(open_kfid, owner=owner, lease_s=lease_s):
                return False
            try:
                acquired = await self._primary.acquire_pull(open_kfid, owner=owner, lease_s=lease_s)
            except StoreUnavailable:
                await self._fallback.release_pull(open_kfid, owner=owner)
                raise
            if not acquired:
                await self._fallback.release_pull(open_kfid, owner=owner)
            return acquired

        return await self._route(
            on_primary, lambda: self._fallback.acquire_pull(open_kfid, owner=owner, lease_s=lease_s)
        )

    async def renew_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        async def on_primary() -> bool:
            shared = await self._primary.renew_pull(open_kfid, owner=owner, lease_s=lease_s)
            local = await self._fallback.renew_pull(open_kfid, owner=owner, lease_s=lease_s)
            if shared or not local:
                return shared
            # Taken during the outage: move it to the shared store, unless another instance holds it now.
            return await self._primary.acquire_pull(open_kfid, owner=owner, lease_s=lease_s)

        return await self._route(
            on_primary, lambda: self._fallback.renew_pull(open_kfid, owner=owner, lease_s=lease_s)
        )

    async def release_pull(self, open_kfid: str, *, owner: str) -> None:
        async def on_primary() -> None:
            await self._primary.release_pull(open_kfid, owner=owner)
            await self._fallback.release_pull(open_kfid, owner=owner)

        await self._route(on_primary, lambda: self._fallback.release_pull(open_kfid, owner=owner))

    async def request_pull(self, open_kfid: str, token: str = "") -> None:
        await self._route(
            lambda: self._primary.request_pull(open_kfid, token),
            lambda: self._fallback.request_pull(open_kfid, token),
        )

    async def pull_requests(self, open_kfid: str) -> tuple[int, str]:
        return await self._route(
            lambda: self._primary.pull_requests(open_kfid), lambda: self._fallback.pull_requests(open_kfid)
        )

    # --- CustomerCounters and CustomerNotes ------------------------------------------------------------
    #
    # Short-lived and advisory (rate windows, session owners, refusals): served by whichever store answers,
    # never written through. During an outage each instance counts and notes for itself, as it would alone.

    async def increment(self, customer: CustomerRef, counter: str, *, ttl_s: float) -> int:
        return await self._route(
            lambda: self._primary.increment(customer, counter, ttl_s=ttl_s),
            lambda: self._fallback.increment(customer, counter, ttl_s=ttl_s),
        )

    async def decrement(self, customer: CustomerRef, counter: str) -> None:
        await self._route(
            lambda: self._primary.decrement(customer, counter),
            lambda: self._fallback.decrement(customer, counter),
        )

    async def counts(self, customer: CustomerRef, counters: Sequence[str]) -> list[int]:
        return await self._route(
            lambda: self._primary.counts(customer, counters),
            lambda: self._fallback.counts(customer, counters),
        )

    async def put_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> None:
        await self._route(
            lambda: self._primary.put_note(customer, topic, value, ttl_s=ttl_s),
            lambda: self._fallback.put_note(customer, topic, value, ttl_s=ttl_s),
        )

    async def add_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> bool:
        return await self._route(
            lambda: self._primary.add_note(customer, topic, value, ttl_s=ttl_s),
            lambda: self._fallback.add_note(customer, topic, value, ttl_s=ttl_s),
        )

    async def get_notes(self, customer: CustomerRef, topics: Sequence[str]) -> dict[str, str]:
        return await self._route(
            lambda: self._primary.get_notes(customer, topics),
            lambda: self._fallback.get_notes(customer, topics),
        )

    async def delete_note(self, customer: CustomerRef, topic: str) -> None:
        async def on_primary() -> None:
            await self._primary.delete_note(customer, topic)
            await self._fallback.delete_note(customer, topic)  # one written during an outage goes too

        await self._route(on_primary, lambda: self._fallback.delete_note(customer, topic))

    # --- KfRegistry -----------------------------------------------------------------------------------

    async def remember_kf(self, open_kfid: str) -> None:
        async def on_primary() -> None:
            await self._primary.remember_kf(open_kfid)
            await self._fallback.remember_kf(open_kfid)

        async def on_fallback() -> None:
            await self._fallback.remember_kf(open_kfid)
            self._dirty_kfs[open_kfid] = None

        await self._route(on_primary, on_fallback)

    async def known_kfs(self) -> list[str]:
        async def on_primary() -> list[str]:
            shared = await self._primary.known_kfs()
            return list(dict.fromkeys([*shared, *await self._fallback.known_kfs()]))

        return await self._route(on_primary, self._fallback.known_kfs)

    # --- ProfileStore ---------------------------------------------------------------------------------
    # A cache of what WeCom says: nothing to write through after an outage (the primary's copy, or a fresh
    # batchget, serves afterwards; the fallback's is read when the primary has none).

    async def get_profile(self, customer: CustomerRef) -> CustomerProfile | None:
        async def on_primary() -> CustomerProfile | None:
            found = await self._primary.get_profile(customer)
            return found if found is not None else await self._fallback.get_profile(customer)

        return await self._route(on_primary, lambda: self._fallback.get_profile(customer))

    async def put_profile(self, customer: CustomerRef, profile: CustomerProfile) -> None:
        await self._route(
            lambda: self._primary.put_profile(customer, profile),
            lambda: self._fallback.put_profile(customer, profile),
        )

    # --- StoreAdmin -----------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether the shared store answers now (degraded mode or not)."""
        try:
            return await self._primary.ping()
        except Exception:
            return False

    async def clear(self) -> None:
        async def on_primary() -> None:
            await self._primary.clear()
            await self._clear_fallback()

        async def on_fallback() -> None:
            await self._clear_fallback()
            self._clear_pending = True

        await self._route(on_primary, on_fallback)

    async def _clear_fallback(self) -> None:
        await self._fallback.clear()
        # DONE marks survive a clear (StoreAdmin.clear): those of the outage are still to be written through.
        for dirty in (self._dirty_kfs, self._dirty_cursors, self._dirty_conversations):
            dirty.clear()


def _merged(shared: list[InboundMessage], local: list[InboundMessage]) -> list[InboundMessage]:
    """A customer's pending messages from both stores, deduplicated by msgid, oldest first."""
    if not local:
        return shared
    seen = {m.msgid for m in shared}
    merged = [*shared, *(m for m in local if m.msgid not in seen)]
    return sorted(merged, key=lambda m: m.send_time)
