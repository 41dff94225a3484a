"""The shared state store: every state port on Memcached, so several instances behind one callback URL agree.

It behaves like `MemoryStateStore`; both pass tests/contract/test_state_store.py.

The key scheme, expiry and namespace generations are described in memcached_keyspace.py; the Inbox role
lives in memcached_inbox.py.

Atomicity: `begin`/`acquire_pull` are `add`; renew and release are `gets` + `cas`, so only the owner changes
a lease; a release writes a short-lived "free" value rather than deleting (memcached's text protocol has no
delete-if-unchanged), which `begin` takes over with CAS. Inbox, its index and the kf list are CAS-updated
read-modify-write loops with bounded retries. A customer's inbox holds at most 500 messages (and 512 KiB,
within memcached's 1 MiB item limit); beyond that the oldest are dropped and an error is logged.

Round trips: a drained message costs `pending()` (`gets`), `claim()` (`add`, with a `get` of the customer's
conversation in the same write, kept at most `CONVERSATION_READ_MAX_AGE_S` for the `get_conversation()` that
follows unless this instance writes the conversation first), `put_conversation()` and `complete()`: the DONE
mark and the inbox CAS in one pipelined write (`MemcacheClient.store_many`) when both keys live on the same
server -- memcached runs one connection's commands in order, so the mark still comes first -- or one after
the other. The CAS uses the token `pending()` read, kept per inbox (at most `INBOX_READS_KEPT` inboxes of up
to `INBOX_READ_MAX_BYTES`); if the inbox changed meanwhile the CAS refuses and the inbox is read again, so a
kept read never decides anything on its own. `record()` reads every index and inbox of a page in one `gets`
and writes the inboxes in one pipelined write; `states()` is one multi-get. Concurrent commands that find
the cached generation too old share one read of it.

Failure: commands run on `memcached_client.MemcacheClient`, on the event loop (no threads), with at most
`max_pool_size` connections per server. A command, including the wait for a free connection, takes at most
`connect_timeout + 2 * timeout`; connecting at most `connect_timeout`, and the server has `timeout` to answer.
A server that is down, refuses, answers an error or too slowly raises `StoreUnavailable` -- never a
False/None that could read as "duplicate" or "missing". Only a pooled connection found closed (typically: the
server restarted since) is retried, on another connection. A connection whose command timed out, was
cancelled or failed is closed, never reused, so no command can read another one's answer.

With several servers, keys are spread with rendezvous hashing, placed exactly as pymemcache's HashClient (used
by earlier versions) places them, and a key always stays on its own node: there is no failover, because moving
a dead node's keys to the other nodes would make a DONE mark read as NEW there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from adapters.outbound import state_codec as codec
from adapters.outbound.memcached_client import MemcacheClient, StoreCommand
from adapters.outbound.memcached_inbox import InboxRead, MemcachedInbox, id_list
from adapters.outbound.memcached_keyspace import (
    CAS_ATTEMPTS,
    SAFE_PREFIX,
    Generations,
    expire_for,
    lease_expire_for,
)
from application.errors import StoreUnavailable
from application.ports import MessageState
from domain.conversation import Conversation
from domain.customer import CustomerProfile
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger(__name__)

PULL_TOKEN_TTL_S = 600
# claim() reads the customer's conversation along with the claim, for the get_conversation() that follows.
CONVERSATION_READS_KEPT = 1024
CONVERSATION_READ_MAX_AGE_S = 1.0


class MemcachedStateStore(MemcachedInbox):
    """All state ports on one or more memcached servers (keys and TTLs: memcached_keyspace.py)."""

    backend = "memcached"

    def __init__(
        self,
        *,
        servers: Sequence[tuple[str, int]],
        prefix: str = "kfdify",
        connect_timeout: float = 5,
        timeout: float = 5,
        conversation_idle_ttl_s: float = 86400,
        done_ttl_s: float = 4 * 86400,
        max_pool_size: int = 16,
        profile_ttl_s: float = 86400,
    ) -> None:
        if not SAFE_PREFIX.fullmatch(prefix):
            raise ValueError("prefix must be 1-64 characters of [A-Za-z0-9_.-]")
        self._prefix = prefix
        self._conversation_ttl = conversation_idle_ttl_s
        self._done_ttl = done_ttl_s
        self._client = MemcacheClient(
            servers, connect_timeout=connect_timeout, timeout=timeout, max_pool_size=max_pool_size
        )
        self._ledger_gen_key = f"{prefix}:gen"
        self._data_gen_key = f"{prefix}:data:gen"
        self._generation: Generations | None = None
        self._generation_read_at = 0.0
        # One read of the generations at a time: when the cached ones age out, concurrent commands share it.
        self._generation_read: asyncio.Task[Generations] | None = None
        self._inbox_reads: dict[str, InboxRead] = {}
        self._conversation_reads: dict[str, tuple[float, bytes | None]] = {}  # key → (monotonic time, value)
        self._done_mark = codec.encode_mark(codec.Mark(codec.DONE))
        self._profile_ttl = profile_ttl_s

    # --- ConversationStore ----------------------------------------------------------------------------

    async def get_conversation(self, customer: CustomerRef) -> Conversation | None:
        key = await self._key("conv", customer.open_kfid, customer.external_userid)
        kept = self._conversation_reads.pop(key, None)
        if kept is not None and time.monotonic() - kept[0] <= CONVERSATION_READ_MAX_AGE_S:
            raw = kept[1]  # what claim() read
        else:
            raw = await self._client.get(key)
        if raw is None:
            return None
        try:
            return codec.decode_conversation(raw)
        except codec.UndecodableValue:
            log.warning("ignoring an unreadable conversation kf=%s", customer.open_kfid)
            return None

    async def put_conversation(self, customer: CustomerRef, conversation: Conversation) -> None:
        key = await self._key("conv", customer.open_kfid, customer.external_userid)
        expire = expire_for(self._conversation_ttl, now=time.time())
        self._conversation_reads.pop(key, None)
        await self._client.set(key, codec.encode_conversation(conversation), expire)

    async def delete_conversation(self, customer: CustomerRef) -> bool:
        key = await self._key("conv", customer.open_kfid, customer.external_userid)
        self._conversation_reads.pop(key, None)
        return bool(await self._client.delete(key))

    # --- MessageLedger --------------------------------------------------------------------------------

    async def begin(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        mk = await self._ledger_key("msg", key.open_kfid, key.msgid)
        return await self._take_lease(mk, owner, lease_expire_for(lease_s, now=time.time()))

    async def claim(self, message: InboundMessage, *, owner: str, lease_s: float) -> bool:
        customer = message.customer
        mk = await self._ledger_key("msg", message.open_kfid, message.msgid)
        conversation_key = await self._key("conv", customer.open_kfid, customer.external_userid)
        expire = lease_expire_for(lease_s, now=time.time())
        held = codec.encode_mark(codec.Mark(codec.BUSY, owner))
        # The claim and a read of the conversation in one round trip (on one server: in that order). Any
        # earlier message of the customer left the inbox only after its conversation update, so the read
        # sees those updates whichever runs first.
        (added,), found = await self._client.store_then_get(
            [StoreCommand("add", mk, held, expire)], [conversation_key]
        )
        if not added:
            # Done, held by another, or a freed lease to take over.
            return await self._take_lease(mk, owner, expire, add_failed=True)
        reads = self._conversation_reads
        reads.pop(conversation_key, None)
        if len(reads) >= CONVERSATION_READS_KEPT:
            del reads[next(iter(reads))]  # the oldest
        reads[conversation_key] = (time.monotonic(), found.get(conversation_key))
        return True

    async def renew(self, key: DedupeKey, *, owner: str, lease_s: float) -> bool:
        mk = await self._ledger_key("msg", key.open_kfid, key.msgid)
        return await self._renew_lease(mk, owner, lease_expire_for(lease_s, now=time.time()))

    async def finish(self, key: DedupeKey) -> None:
        mk = await self._ledger_key("msg", key.open_kfid, key.msgid)
        expire = expire_for(self._done_ttl, now=time.time())
        await self._client.set(mk, self._done_mark, expire)

    async def release(self, key: DedupeKey, *, owner: str) -> None:
        await self._release_lease(await self._ledger_key("msg", key.open_kfid, key.msgid), owner)

    async def state(self, key: DedupeKey) -> MessageState:
        mk = await self._ledger_key("msg", key.open_kfid, key.msgid)
        return _message_state(await self._client.get(mk))

    async def states(self, keys: Sequence[DedupeKey]) -> list[MessageState]:
        if not keys:
            return []
        names = [await self._ledger_key("msg", key.open_kfid, key.msgid) for key in keys]
        found = await self._client.get_many(names)
        return [_message_state(found.get(name)) for name in names]

    # --- CursorStore ----------------------------------------------------------------------------------

    async def get_cursor(self, open_kfid: str) -> str | None:
        raw = await self._client.get(await self._key("cursor", open_kfid))
        if raw is None:
            return None
        try:
            return codec.decode_str(raw)
        except codec.UndecodableValue:
            log.warning("ignoring an unreadable cursor kf=%s", open_kfid)
            return None

    async def set_cursor(self, open_kfid: str, cursor: str) -> None:
        await self._client.set(await self._key("cursor", open_kfid), codec.encode_str(cursor), 0)

    # --- PullCoordination -----------------------------------------------------------------------------

    async def acquire_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        key = await self._ledger_key("pull", open_kfid)
        return await self._take_lease(key, owner, lease_expire_for(lease_s, now=time.time()))

    async def renew_pull(self, open_kfid: str, *, owner: str, lease_s: float) -> bool:
        key = await self._ledger_key("pull", open_kfid)
        return await self._renew_lease(key, owner, lease_expire_for(lease_s, now=time.time()))

    async def release_pull(self, open_kfid: str, *, owner: str) -> None:
        await self._release_lease(await self._ledger_key("pull", open_kfid), owner)

    async def request_pull(self, open_kfid: str, token: str = "") -> None:
        counter = await self._key("pullreq", open_kfid)
        for _ in range(CAS_ATTEMPTS):
            if await self._client.incr(counter, 1) is not None:
                break
            # First request: create the counter. Losing this race to another instance is fine, both incr next.
            await self._client.add(counter, b"0", 0)
        else:
            raise StoreUnavailable("memcached keeps losing the pull counter")
        if token:
            key = await self._key("pulltoken", open_kfid)
            await self._client.set(key, codec.encode_str(token), PULL_TOKEN_TTL_S)

    async def pull_requests(self, open_kfid: str) -> tuple[int, str]:
        counter, token_key = await self._key("pullreq", open_kfid), await self._key("pulltoken", open_kfid)
        found = await self._client.get_many([counter, token_key])
        try:
            count = int(found.get(counter) or 0)
        except ValueError:
            count = 0
        raw_token = found.get(token_key)
        try:
            token = codec.decode_str(raw_token) if raw_token is not None else ""
        except codec.UndecodableValue:
            token = ""
        return count, token

    # --- CustomerCounters -----------------------------------------------------------------------------

    async def increment(self, customer: CustomerRef, counter: str, *, ttl_s: float) -> int:
        key = await self._key("count", customer.open_kfid, customer.external_userid, counter)
        expire = expire_for(ttl_s, now=time.time())
        for _ in range(CAS_ATTEMPTS):
            value = await self._client.incr(key, 1)
            if value is not None:
                return value
            # First count in this window: create it. Losing this race to another instance is fine, both incr.
            await self._client.add(key, b"0", expire)
        raise StoreUnavailable("memcached keeps losing a customer counter")

    async def decrement(self, customer: CustomerRef, counter: str) -> None:
        key = await self._key("count", customer.open_kfid, customer.external_userid, counter)
        await self._client.decr(key, 1)  # absent: nothing to take back

    async def counts(self, customer: CustomerRef, counters: Sequence[str]) -> list[int]:
        keys = [await self._key("count", customer.open_kfid, customer.external_userid, c) for c in counters]
        found = await self._client.get_many(keys)
        return [_count(found.get(key)) for key in keys]

    # --- CustomerNotes --------------------------------------------------------------------------------

    async def put_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> None:
        key = await self._key("note", customer.open_kfid, customer.external_userid, topic)
        await self._client.set(key, codec.encode_str(value), expire_for(ttl_s, now=time.time()))

    async def add_note(self, customer: CustomerRef, topic: str, value: str, *, ttl_s: float) -> bool:
        key = await self._key("note", customer.open_kfid, customer.external_userid, topic)
        return await self._client.add(key, codec.encode_str(value), expire_for(ttl_s, now=time.time()))

    async def get_notes(self, customer: CustomerRef, topics: Sequence[str]) -> dict[str, str]:
        keys = {await self._key("note", customer.open_kfid, customer.external_userid, t): t for t in topics}
        notes: dict[str, str] = {}
        for key, raw in (await self._client.get_many(keys)).items():
            try:
                notes[keys[key]] = codec.decode_str(raw)
            except codec.UndecodableValue:
                log.warning("ignoring an undecodable note %s", key)
        return notes

    async def delete_note(self, customer: CustomerRef, topic: str) -> None:
        key = await self._key("note", customer.open_kfid, customer.external_userid, topic)
        await self._client.delete(key)

    # --- KfRegistry -----------------------------------------------------------------------------------

    async def remember_kf(self, open_kfid: str) -> None:
        def added(raw: bytes | None) -> tuple[bytes, int] | None:
            kfs = id_list(raw)
            return None if open_kfid in kfs else (codec.encode_str_list([*kfs, open_kfid]), 0)

        await self._cas_update(await self._key("kfs"), added)

    async def known_kfs(self) -> list[str]:
        return id_list(await self._client.get(await self._key("kfs")))

    # --- ProfileStore ---------------------------------------------------------------------------------

    async def get_profile(self, customer: CustomerRef) -> CustomerProfile | None:
        raw = await self._client.get(await self._key("profile", customer.open_kfid, customer.external_userid))
        if raw is None:
            return None
        try:
            return CustomerProfile.from_dict(codec.loads(raw))
        except (codec.UndecodableValue, ValueError):
            log.warning("ignoring an unreadable customer profile kf=%s", customer.open_kfid)
            return None

    async def put_profile(self, customer: CustomerRef, profile: CustomerProfile) -> None:
        key = await self._key("profile", customer.open_kfid, customer.external_userid)
        await self._client.set(
            key, codec.dumps(profile.to_dict()), expire_for(self._profile_ttl, now=time.time())
        )

    # --- StoreAdmin -----------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """True when every server answers `version` now."""
        try:
            for node in self._client.nodes:
                await self._client.version(node)
        except StoreUnavailable:
            return False
        return True

    async def clear(self) -> None:
        """A new data generation: conversations, inboxes, cursors, pull requests and known kf accounts become
        unreachable, and so do notes and counters; message marks and leases and pull leases (the ledger
        generation) stay (see `StoreAdmin.clear`)."""
        for _ in range(CAS_ATTEMPTS):
            generation = await self._client.incr(self._data_gen_key, 1)
            if generation is not None:
                break
            # No generation yet (or its node restarted): start past any this prefix could have used.
            fresh = time.time_ns() // 1_000_000
            if await self._client.add(self._data_gen_key, str(fresh).encode(), 0):
                generation = fresh
                break
        else:
            raise StoreUnavailable("memcached keeps losing the namespace generation")
        ledger = (await self._current_generation()).ledger
        self._generation = Generations(ledger, self._parse_generation(generation))
        self._generation_read_at = time.monotonic()
        self._inbox_reads.clear()
        self._conversation_reads.clear()


def _count(raw: bytes | None) -> int:
    try:
        return max(int(raw or 0), 0)
    except ValueError:
        return 0


def _message_state(raw: bytes | None) -> MessageState:
    if raw is None:
        return MessageState.NEW
    status = codec.decode_mark(raw).status
    if status == codec.DONE:
        return MessageState.DONE
    return MessageState.NEW if status == codec.FREE else MessageState.BUSY
