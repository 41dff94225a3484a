"""The embedded state store: everything in this process's memory. Lost on restart, not shared.

It is the store for a single instance without Memcached, and the fake for tests; both pass the same
contract suite as the Memcached store (tests/contract/test_state_store.py).

Memory is bounded by `max_keys`, counted over customer notes and counters, conversations, message marks
(leases and DONE marks) and pending inbox messages. Notes and counters (advisory, short-lived) are evicted
first. Eviction never touches what keeps the service going: cursors, pull leases, pull requests and tokens,
and known kf accounts (a handful per kf account). When full, it drops what has expired, then the least
recently used conversations (the customer's next message starts a new one), then -- kept as long as that
allows -- the least recently used message marks (a lost DONE mark matters only if the history is pulled again,
which a kept cursor avoids), and only as a last resort a pending message (never answered: logged as an error).
Reads count as use.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from application.ports import MessageState
from domain.conversation import Conversation
from domain.customer import CustomerProfile
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger(__name__)

# Dedupe marks outlive WeCom's three-day history window, so a replayed history is never answered twice.
DEFAULT_DONE_TTL_S = 4 * 24 * 3600
DEFAULT_CONVERSATION_IDLE_TTL_S = 24 * 3600
DEFAULT_PROFILE_TTL_S = 24 * 3600
# A full store looks for expired entries (a scan of everything) at most this often.
EXPIRY_SWEEP_INTERVAL_S = 60.0

# Never evicted: losing one stops or repeats work (a lost cursor re-pulls the whole history).
_PINNED_KINDS = frozenset({"cursor", "pull", "pullreq", "pulltoken"})
_LEDGER_KIND = "msg"
# Notes and counters about customers (CustomerNotes, CustomerCounters): short-lived, evicted first.
_SHARED_KINDS = frozenset({"note", "count"})


@dataclass(slots=True)
class _Entry:
    value: object
    expires_at: float  # 0 = never


Key = tuple[str, ...]


class MemoryStateStore:
    """All state ports in dicts with expiry. Safe because the event loop runs one coroutine at a time."""

    backend = "memory"

    def __init__(
        self,
        *,
        conversation_idle_ttl_s: float = DEFAULT_CONVERSATION_IDLE_TTL_S,
        done_ttl_s: float = DEFAULT_DONE_TTL_S,
        clock: Callable[[], float] = time.time,
        max_keys: int = 200_000,
        profile_ttl_s: float = DEFAULT_PROFILE_TTL_S,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._conversation_ttl = conversation_idle_ttl_s
        self._done_ttl = done_ttl_s
        self._clock = clock
        self._max_keys = max_keys
        self._next_sweep_at = 0.0
        self._pinned: dict[Key, _Entry] = {}
        self._conversations: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._ledger: OrderedDict[Key, _Entry] = OrderedDict()
        self._notes: OrderedDict[Key, _Entry] = OrderedDict()  # notes and counters, least recently used first
        self._inbox: OrderedDict[CustomerRef, dict[str, InboundMessage]] = OrderedDict()
        self._inbox_size = 0  # messages in all inboxes
        self._kfs: dict[str, None] = {}
        # Profiles live with the conversations (evictable, least recently used first, forgotten by clear()).
        self._profile_ttl = profile_ttl_s

    @property
    def size(self) -> int:
        """What counts against `max_keys`: notes and counters, conversations, message marks and pending
        messages."""
        return len(self._notes) + len(self._conversations) + len(self._ledger) + self._inbox_size

    # --- plumbing -------------------------------------------------------------------------------------

    def _table(self, key: Key) -> dict[Key, _Entry]:
        if key[0] in _PINNED_KINDS:
            return self._pinned
        if key[0] in _SHARED_KINDS:
            return self._notes
        return self._ledger if key[0] == _LEDGER_KIND else self._conversations

    def _get(self, key: Key) -> object | None:
        table = self._table(key)
        entry = table.get(key)
        if entry is None:
            return None
        if entry.expires_at and entry.expires_at <= self._clock():
            del table[key]
            return None
        if isinstance(table, OrderedDict):
            table.move_to_end(key)
        return entry.value

    def _set(self, key: Key, value: object, ttl_s: float) -> None:
        table = self._table(key)
        if table is not self._pinned and key not in table:
            self._make_room(1)
        table.pop(key, None)  # (re)inserted last: the most recently used
        table[key] = _Entry(value, self._clock() + ttl_s if ttl_s > 0 else 0.0)

    def _delete(self, key: Key) -> None:
        self._table(key).pop(key, None)

    def _add(self, key: Key, value: object, ttl_s: float) -> bool:
        if self._get(key) is not None:
            return False
        self._set(key, value, ttl_s)
        return True

    def _make_room(self, count: int) -> None:
        """Evict until `count` more fit: expired entries, then the least recently used conversations, then
        the least recently used message marks, and only as a last resort the oldest pending message of the
        least recently used inbox."""
        if self.size + count <= self._max_keys:
            return
        now = self._clock()
        if now >= self._next_sweep_at:
            self._next_sweep_at = now + EXPIRY_SWEEP_INTERVAL_S
            for table in (self._notes, self._conversations, self._ledger):
                for key in [k for k, e in table.items() if e.expires_at and e.expires_at <= now]:
                    del table[key]
        dropped: list[InboundMessage] = []
        while self.size + count > self._max_keys:
            if self._notes:
                self._notes.popitem(last=False)
            elif self._conversations:
                self._conversations.popitem(last=False)
            elif self._ledger:
                self._ledger.popitem(last=False)
            elif self._inbox:
                customer, box = next(iter(self._inbox.items()))
                oldest = min(box.values(), key=lambda m: m.send_time)
                del box[oldest.msgid]
                self._inbox_size -= 1
                if not box:
                    del self._inbox[customer]
                dropped.append(oldest)
            else:
                break  # nothing evictable left
        if dropped:
            log.error(
                "in-process store full (max_keys=%d): dropped %d pending message(s), the first of kf=%s "
                "customer=%s; give it more room or use Memcached",
                self._max_keys,
                len(dropped),
                dropped[0].open_kfid,
                dropped[0].external_userid,
            )

    # --- ConversationStore ----------------------------------------------------------------------------

    async def get_conversation(self, customer: CustomerRef) -> Conversation | None:
        value = self._get(("conv", customer.open_kfid, customer.external_userid))
        return value if isinstance(value, Conversation) else None

    async def put_conversation(self, customer: CustomerRef, conversation: Conversation) -> None:
        self._set(
            ("conv", customer.open_kfid, customer.external_userid), conversation, self._conversation_ttl
        )

    async def delete_conversation(self, customer: CustomerRef) -> bool:
        key = ("conv", customer.open_kfid, customer.external_userid)
        existed = self._get(key) is not None
        self._delete(key)
        return existed

    # --- MessageLedger --------------------------------------------------------------------------------

    async def begin(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        return self._add((_LEDGER_KIND, key.open_kfid, key.msgid), ("busy", owner), lease_s)

    async def renew(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        k = (_LEDGER_KIND, key.open_kfid, key.msgid)
        if self._get(k) != ("busy", owner):
            return False
        self._set(k, ("busy", owner), lease_s)
        return True

    async def finish(self, key: DedupeKey) -> None:
        self._set((_LEDGER_KIND, key.open_kfid, key.msgid), ("done", ""), self._done_ttl)

    async def release(self, key: DedupeKey, *, owner: str) -> None:
        k = (_LEDGER_KIND, key.open_kfid, key.msgid)
        if self._get(k) == ("busy", owner):
            self._delete(k)

    async def state(self, key: DedupeKey) -> MessageState:
        value = self._get((_LEDGER_KIND, key.open_kfid, key.msgid))
        if value is None:
            return MessageState.NEW
        return MessageState.DONE if value[0] == "done" else MessageState.BUSY  # type: ignore[index]

    async def states(self, keys: Sequence[DedupeKey]) -> list[MessageState]:
        return [await self.state(key) for key in keys]

    # --- Inbox ----------------------------------------------------------------------------------------

    async def record(self, messages: Sequence[InboundMessage]) -> None:
        for message in messages:
            box = self._inbox.get(message.customer)
            if box is not None and message.msgid in box:
                continue
            self._make_room(1)
            box = self._inbox.setdefault(message.customer, {})  # making room may have dropped it
            box[message.msgid] = message
            self._inbox.move_to_end(message.customer)
            self._inbox_size += 1

    async def pending(self, customer: CustomerRef) -> list[InboundMessage]:
        box = self._inbox.get(customer)
        if box is None:
            return []
        self._inbox.move_to_end(customer)
        # Stable sort: equal send_times keep the order WeCom returned them in.
        return sorted(box.values(), key=lambda m: m.send_time)

    async def remove(self, customer: CustomerRef, msgid: str) -> list[InboundMessage]:
        box = self._inbox.get(customer)
        if box is None:
            return []
        if box.pop(msgid, None) is not None:
            self._inbox_size -= 1
        if not box:
            del self._inbox[customer]
        return await self.pending(customer)

    async def claim(self, message: InboundMessage, *, owner: str, lease_s: float) -> bool:
        return await self.begin(DedupeKey.for_message(message), owner=owner, lease_s=lease_s)

    async def complete(self, message: InboundMessage) -> list[InboundMessage]:
        await self.finish(DedupeKey.for_message(message))
        return await self.remove(message.customer, message.msgid)

    async def customers_with_pending(
        self, open_kfid: str, *, unread: Collection[CustomerRef] = ()
    ) -> list[CustomerRef]:
        # Reading an inbox here costs nothing: `unread` changes nothing, the answer is exact.
        return [c for c, box in self._inbox.items() if c.open_kfid == open_kfid and box]

    # --- CustomerCounters -----------------------------------------------------------------------------

    async def increment(self, customer: CustomerRef, counter: str, *, ttl_s: float) -> int:
        key = ("count", customer.open_kfid, customer.external_userid, counter)
        current = self._get(key)
        if not isinstance(current, int):
            self._set(key, 1, ttl_s)
            return 1
        entry = self._notes[key]  # keeps its expiry: increments do not extend a counter
        entry.value = current + 1
        return current + 1

    async def decrement(self, customer: CustomerRef, counter: str) -> None:
        key = ("count", customer.open_kfid, customer.external_userid, counter)
        current = self._get(key)
        if isinstance(current, int) and current > 0:
            self._notes[key].value = current - 1

    async def counts(self, customer: CustomerRef, counters: Sequence[str]) -> list[int]:
        values = [self._get(("count", customer.open_kfid, customer.external_userid, c)) for c in counters]
        return [value if isinstance(value, int) else 0 for value in values]

    # --- CustomerNotes --------------------------------------------------------------------------------

    async def put_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> None:
        self._set(("note", customer.open_kfid, customer.external_userid, topic), value, ttl_s)

    async def add_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> bool:
        return self._add(("note", customer.open_kfid, customer.external_userid, topic), value, ttl_s)

    async def get_notes(self, customer: CustomerRef, topics: Sequence[str]) -> dict[str, str]:
        found = {t: self._get(("note", customer.open_kfid, customer.external_userid, t)) for t in topics}
        return {topic: value for topic, value in found.items() if isinstance(value, str)}

    async def delete_note(self, customer: CustomerRef, topic: str) -> None:
        self._delete(("note", customer.open_kfid, customer.external_userid, topic))

    # --- CursorStore ----------------------------------------------------------------------------------

    async def get_cursor(self, open_kfid: str) -> str | None:
        value = self._get(("cursor", open_kfid))
        return value if isinstance(value, str) else None

    async def set_cursor(self, open_kfid: str, cursor: str) -> None:
        self._set(("cursor", open_kfid), cursor, 0)

    # --- PullCoordination -----------------------------------------------------------------------------

    async def acquire_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        return self._add(("pull", open_kfid), owner, lease_s)

    async def renew_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        if self._get(("pull", open_kfid)) != owner:
            return False
        self._set(("pull", open_kfid), owner, lease_s)
        return True

    async def release_pull(self, open_kfid: str, *, owner: str) -> None:
        if self._get(("pull", open_kfid)) == owner:
            self._delete(("pull", open_kfid))

    async def request_pull(self, open_kfid: str, token: str = "") -> None:
        count = self._get(("pullreq", open_kfid))
        self._set(("pullreq", open_kfid), (count if isinstance(count, int) else 0) + 1, 0)
        if token:
            # The callback token is valid for 10 minutes.
            self._set(("pulltoken", open_kfid), token, 600)

    async def pull_requests(self, open_kfid: str) -> tuple[int, str]:
        count = self._get(("pullreq", open_kfid))
        token = self._get(("pulltoken", open_kfid))
        return (count if isinstance(count, int) else 0, token if isinstance(token, str) else "")

    # --- KfRegistry -----------------------------------------------------------------------------------

    async def remember_kf(self, open_kfid: str) -> None:
        self._kfs[open_kfid] = None

    async def known_kfs(self) -> list[str]:
        return list(self._kfs)

    # --- ProfileStore ---------------------------------------------------------------------------------

    async def get_profile(self, customer: CustomerRef) -> CustomerProfile | None:
        value = self._get(("profile", customer.open_kfid, customer.external_userid))
        return value if isinstance(value, CustomerProfile) else None

    async def put_profile(self, customer: CustomerRef, profile: CustomerProfile) -> None:
        self._set(("profile", customer.open_kfid, customer.external_userid), profile, self._profile_ttl)

    # --- StoreAdmin -----------------------------------------------------------------------------------

    async def ping(self) -> bool:
        return True

    async def clear(self) -> None:
        """Forget conversations, notes and counters, inboxes, cursors, pull requests and known kf accounts.
        Message marks (DONE marks and leases) and pull leases are kept: see `StoreAdmin.clear`."""
        self._conversations.clear()
        self._notes.clear()
        self._inbox.clear()
        self._inbox_size = 0
        self._kfs.clear()
        for key in [k for k in self._pinned if k[0] != "pull"]:
            del self._pinned[key]
