"""The embedded state store: everything in this process's memory. Lost on restart, not shared.

It is the store for a single instance without Memcached, and the fake for tests; both pass the same
contract suite as the Memcached store (tests/contract/test_state_store.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from application.ports import MessageState
from domain.conversation import Conversation
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage

# Dedupe marks outlive WeCom's three-day history window, so a replayed history is never answered twice.
DEFAULT_DONE_TTL_S = 4 * 24 * 3600
DEFAULT_CONVERSATION_IDLE_TTL_S = 24 * 3600


@dataclass(slots=True)
class _Entry:
    value: object
    expires_at: float  # 0 = never


class MemoryStateStore:
    """All state ports in one dict with expiry. Safe because the event loop runs one coroutine at a time."""

    backend = "memory"

    def __init__(
        self,
        *,
        conversation_idle_ttl_s: float = DEFAULT_CONVERSATION_IDLE_TTL_S,
        done_ttl_s: float = DEFAULT_DONE_TTL_S,
        clock: Callable[[], float] = time.time,
        max_keys: int = 200_000,
    ) -> None:
        self._conversation_ttl = conversation_idle_ttl_s
        self._done_ttl = done_ttl_s
        self._clock = clock
        self._max_keys = max_keys
        self._data: dict[tuple[str, ...], _Entry] = {}
        self._inbox: dict[CustomerRef, dict[str, InboundMessage]] = {}
        self._kfs: dict[str, None] = {}

    # --- plumbing -------------------------------------------------------------------------------------

    def _get(self, key: tuple[str, ...]) -> object | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_at and entry.expires_at <= self._clock():
            del self._data[key]
            return None
        return entry.value

    def _set(self, key: tuple[str, ...], value: object, ttl_s: float) -> None:
        if len(self._data) >= self._max_keys and key not in self._data:
            self._evict()
        self._data[key] = _Entry(value, self._clock() + ttl_s if ttl_s > 0 else 0.0)

    def _add(self, key: tuple[str, ...], value: object, ttl_s: float) -> bool:
        if self._get(key) is not None:
            return False
        self._set(key, value, ttl_s)
        return True

    def _evict(self) -> None:
        """Bound memory like Memcached does: drop expired entries, then the oldest ones."""
        now = self._clock()
        for key in [k for k, e in self._data.items() if e.expires_at and e.expires_at <= now]:
            del self._data[key]
        overflow = len(self._data) - int(self._max_keys * 0.9)
        for key in list(self._data)[: max(overflow, 0)]:
            del self._data[key]

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
        self._data.pop(key, None)
        return existed

    # --- MessageLedger --------------------------------------------------------------------------------

    async def begin(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        return self._add(("msg", key.open_kfid, key.msgid), ("busy", owner), lease_s)

    async def renew(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        k = ("msg", key.open_kfid, key.msgid)
        if self._get(k) != ("busy", owner):
            return False
        self._set(k, ("busy", owner), lease_s)
        return True

    async def finish(self, key: DedupeKey) -> None:
        self._set(("msg", key.open_kfid, key.msgid), ("done", ""), self._done_ttl)

    async def release(self, key: DedupeKey, *, owner: str) -> None:
        k = ("msg", key.open_kfid, key.msgid)
        if self._get(k) == ("busy", owner):
            del self._data[k]

    async def state(self, key: DedupeKey) -> MessageState:
        value = self._get(("msg", key.open_kfid, key.msgid))
        if value is None:
            return MessageState.NEW
        return MessageState.DONE if value[0] == "done" else MessageState.BUSY  # type: ignore[index]

    async def states(self, keys: Sequence[DedupeKey]) -> list[MessageState]:
        return [await self.state(key) for key in keys]

    # --- Inbox ----------------------------------------------------------------------------------------

    async def record(self, messages: Sequence[InboundMessage]) -> None:
        for message in messages:
            box = self._inbox.setdefault(message.customer, {})
            box.setdefault(message.msgid, message)

    async def pending(self, customer: CustomerRef) -> list[InboundMessage]:
        box = self._inbox.get(customer, {})
        # Stable sort: equal send_times keep the order WeCom returned them in.
        return sorted(box.values(), key=lambda m: m.send_time)

    async def remove(self, customer: CustomerRef, msgid: str) -> list[InboundMessage]:
        box = self._inbox.get(customer)
        if box is None:
            return []
        box.pop(msgid, None)
        if not box:
            del self._inbox[customer]
        return await self.pending(customer)

    async def claim(self, message: InboundMessage, *, owner: str, lease_s: float) -> bool:
        return await self.begin(DedupeKey.for_message(message), owner=owner, lease_s=lease_s)

    async def complete(self, message: InboundMessage) -> list[InboundMessage]:
        await self.finish(DedupeKey.for_message(message))
        return await self.remove(message.customer, message.msgid)

    async def customers_with_pending(self, open_kfid: str) -> list[CustomerRef]:
        return [c for c, box in self._inbox.items() if c.open_kfid == open_kfid and box]

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
            del self._data[("pull", open_kfid)]

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

    # --- StoreAdmin -----------------------------------------------------------------------------------

    async def ping(self) -> bool:
        return True

    async def clear(self) -> None:
        self._data.clear()
        self._inbox.clear()
        self._kfs.clear()
