"""The shared state store: every state port on Memcached, so several instances behind one callback URL agree.

It behaves like `MemoryStateStore`; both pass tests/contract/test_state_store.py.

Keys
----
``{prefix}:{generation}:{kind}:{part}[:{part}]``, e.g. ``kfdify:1718000000000:msg:wkAbc:msg123``.

- A part made only of ``[A-Za-z0-9_.-]`` is kept as is; any other part (spaces, CJK, newlines, ``:``) becomes
  ``#`` + blake2b-128 hex. ``#`` never occurs in a kept part, so a hashed part cannot collide with a raw one.
  When a key would still exceed memcached's 250 bytes, every long part is hashed too.
- ``{prefix}:data:gen`` holds the data generation, used by conversations, inboxes, cursors, pull requests and
  the kf list. `clear()` increments it: all of those become unreachable at once (and expire by themselves)
  without touching anything outside this prefix. ``{prefix}:gen`` holds the ledger generation, used by message
  marks and leases (`msg`) and pull leases (`pull`); `clear()` leaves it alone, so a message answered before a
  clear is never answered again and a pull running during a clear keeps its lease. (Versions before the split
  had only ``{prefix}:gen`` and bumped it on clear: during a rolling upgrade both versions share the ledger,
  so no message is answered twice; the new version starts with a fresh data generation, i.e. it re-reads
  WeCom's history once -- answered messages read DONE -- and starts new Dify conversations.)
  A missing generation (first start, or the node holding it restarted) is created as the current time in
  milliseconds, so data from before a `clear()` can never become reachable again. Each instance caches both
  generations (read in one round trip) for at most `GENERATION_CACHE_S` (1 s): after `clear()` on instance
  A, instance B uses the new namespace within 1 s. With several servers the generations live on one or two
  of them: while one of those is down, every operation fails.

| kind        | value (JSON, see state_codec)          | expiry                                              |
|-------------|----------------------------------------|-----------------------------------------------------|
| `conv`      | Conversation                           | `conversation_idle_ttl_s` (24 h), refreshed by put  |
| `msg`       | `{"s":"busy","o":owner}` lease         | `lease_s` rounded up, + 1 s (see below)             |
|             | `{"s":"done"}` mark                    | `done_ttl_s` (4 days: outlives the 3-day history)   |
|             | `{"s":"free"}` released lease          | 60 s (reads as NEW; taken over with CAS)            |
| `inbox`     | list of InboundMessage, send order     | `done_ttl_s`, refreshed on every change             |
| `inboxidx`  | external_userids with pending messages | none                                                |
| `cursor`    | string                                 | none                                                |
| `pull`      | pull lease, like the `msg` lease       | `lease_s` rounded up, + 1 s                         |
| `pullreq`   | decimal counter (`incr`)               | none                                                |
| `pulltoken` | newest callback token                  | 600 s (the callback token's lifetime)               |
| `kfs`       | list of open_kfids                     | none                                                |
| `note`      | a customer's note (string) per topic   | the note's `ttl_s`                                  |
| `count`     | a customer's decimal counter (`incr`)  | `ttl_s` from its creation (`incr` keeps it)         |

"None" means memcached may still evict the key under memory pressure (LRU): give memcached enough memory
(`-m`) for the working set. A lost cursor means a re-pull (dedupe marks absorb it); a lost mark after its
message left WeCom's history window is harmless. TTLs over 30 days are sent as absolute Unix times, because
memcached reads them that way. Memcached's clock ticks once a second, so an item stored with TTL n lives
between n-1 and n seconds: leases get one extra second so that they last at least `lease_s`.

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
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from typing import NamedTuple

from adapters.outbound import state_codec as codec
from adapters.outbound.memcached_client import MemcacheClient, StoreCommand
from application.errors import StoreUnavailable
from application.ports import MessageState
from domain.conversation import Conversation
from domain.customer import CustomerProfile
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger(__name__)

# A `gets` result: (value, cas token), or (None, None) when the key is absent.
Read = tuple[bytes, bytes] | tuple[None, None]
ABSENT: Read = (None, None)
# An inbox as pending() read it: value, CAS token, messages.
InboxRead = tuple[bytes, bytes, list[InboundMessage]]

MAX_KEY_BYTES = 250
MAX_RELATIVE_TTL_S = 30 * 24 * 3600  # memcached reads a larger exptime as an absolute Unix time
GENERATION_CACHE_S = 1.0
PULL_TOKEN_TTL_S = 600
FREED_LEASE_TTL_S = 60
EMPTY_INBOX_TTL_S = 300
INBOX_MAX_MESSAGES = 500
INBOX_MAX_BYTES = 512 * 1024  # memcached's default item size limit is 1 MiB
CAS_ATTEMPTS = 40
# pending() keeps what it read (value and CAS token), so the remove() that usually follows can write at once
# instead of reading again; a stale entry costs only that read (the CAS refuses it). Bounded in number, size.
INBOX_READS_KEPT = 1024
INBOX_READ_MAX_BYTES = 8 * 1024
# claim() reads the customer's conversation along with the claim, for the get_conversation() that follows.
CONVERSATION_READS_KEPT = 1024
CONVERSATION_READ_MAX_AGE_S = 1.0

_SAFE_PART = re.compile(r"[A-Za-z0-9_.-]*")
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASH_MARK = "#"


class Generations(NamedTuple):
    """The two namespace generations: `ledger` for what `clear()` keeps, `data` for what it forgets."""

    ledger: int
    data: int


def _hashed(part: str) -> str:
    return _HASH_MARK + hashlib.blake2b(part.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def build_key(prefix: str, generation: int, kind: str, *parts: str) -> str:
    """A memcached-safe key: printable ASCII without whitespace, at most 250 bytes, whatever the ids hold."""
    safe = [p if _SAFE_PART.fullmatch(p) else _hashed(p) for p in parts]
    key = ":".join([prefix, str(generation), kind, *safe])
    if len(key) > MAX_KEY_BYTES:
        safe = [s if len(s) <= len(_hashed("")) else _hashed(p) for p, s in zip(parts, safe, strict=True)]
        key = ":".join([prefix, str(generation), kind, *safe])
    return key


# Keys are rebuilt for every command: remember the recent ones (ids are validated and maybe hashed each time).
_cached_key = lru_cache(maxsize=16384)(build_key)


def expire_for(ttl_s: float, *, now: float) -> int:
    """Memcached's exptime for a TTL: 0 = never; whole seconds, rounded up; absolute past 30 days."""
    if ttl_s <= 0:
        return 0
    seconds = max(1, math.ceil(ttl_s))
    return int(now) + seconds if seconds > MAX_RELATIVE_TTL_S else seconds


def lease_expire_for(lease_s: float, *, now: float) -> int:
    """A lease lasts at least `lease_s`: whole seconds rounded up (minimum 1) plus one clock tick."""
    return expire_for(max(1, math.ceil(lease_s)) + 1, now=now)


class MemcachedStateStore:
    """All state ports on one or more memcached servers (see the module docstring for keys and TTLs)."""

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
        if not _SAFE_PREFIX.fullmatch(prefix):
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

    # --- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse further commands and close the connections (a command still running closes its own)."""
        self._client.close()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- plumbing -------------------------------------------------------------------------------------

    async def _current_generation(self) -> Generations:
        if self._generation is not None and time.monotonic() - self._generation_read_at < GENERATION_CACHE_S:
            return self._generation
        read = self._generation_read
        if read is None or read.done() or read.get_loop() is not asyncio.get_running_loop():
            read = self._generation_read = asyncio.ensure_future(self._read_generation())
            read.add_done_callback(_retrieve)
        # Shielded: a caller that is cancelled must not cancel the read the others wait for.
        return await asyncio.shield(read)

    async def _read_generation(self) -> Generations:
        started = time.monotonic()
        names = [self._ledger_gen_key, self._data_gen_key]
        found = await self._client.get_many(names)
        missing = [name for name in names if found.get(name) is None]
        if missing:
            # First start, or the node holding it restarted: past any value this prefix could have used.
            fresh = str(time.time_ns() // 1_000_000).encode()
            for name in missing:
                await self._client.add(name, fresh, 0)
            found = await self._client.get_many(names)
            if any(found.get(name) is None for name in names):
                raise StoreUnavailable("memcached lost the namespace generation")
        generation = Generations(
            self._parse_generation(found[self._ledger_gen_key]),
            self._parse_generation(found[self._data_gen_key]),
        )
        self._generation, self._generation_read_at = generation, started
        return generation

    @staticmethod
    def _parse_generation(raw: bytes | int) -> int:
        try:
            return int(raw)
        except ValueError:
            raise StoreUnavailable("the namespace generation is not a number") from None

    async def _key(self, kind: str, *parts: str) -> str:
        """A key in the data generation, which `clear()` replaces."""
        return _cached_key(self._prefix, (await self._current_generation()).data, kind, *parts)

    async def _ledger_key(self, kind: str, *parts: str) -> str:
        """A key `clear()` keeps: message marks and leases, pull leases."""
        return _cached_key(self._prefix, (await self._current_generation()).ledger, kind, *parts)

    async def _cas_update(
        self, key: str, change: Callable[[bytes | None], tuple[bytes, int] | None], read: Read | None = None
    ) -> None:
        """Read-modify-write `key` until nobody changed it in between.

        `change` maps the current value (None when absent) to (new value, exptime), or None for "no change".
        `read`: the key's `gets` result if the caller already has it (saves the first read).
        """
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                # Someone else wrote it in between: step aside for a moment so the writers spread out.
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 10)))
            value, token = read if read is not None and not attempt else await self._client.gets(key)
            changed = change(value)
            if changed is None:
                return
            new, expire = changed
            if value is None:
                if await self._client.add(key, new, expire):
                    return
            elif await self._client.cas(key, new, token, expire):
                return
        raise StoreUnavailable("memcached key too contended to update")

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

    async def _take_lease(self, key: str, owner: str, expire: int, *, add_failed: bool = False) -> bool:
        """`add_failed`: the caller's own `add` just found the key taken (saves trying it again)."""
        held = codec.encode_mark(codec.Mark(codec.BUSY, owner))
        for _ in range(CAS_ATTEMPTS):
            if not add_failed and await self._client.add(key, held, expire):
                return True
            add_failed = False
            raw, token = await self._client.gets(key)
            if raw is None:
                continue  # expired in between: try add again
            if codec.decode_mark(raw).status != codec.FREE:
                return False
            if await self._client.cas(key, held, token, expire):
                return True
            # Someone else took over the freed lease (False) or it expired (None): look again.
        raise StoreUnavailable("memcached key too contended to update")

    async def _renew_lease(self, key: str, owner: str, expire: int) -> bool:
        for _ in range(CAS_ATTEMPTS):
            raw, token = await self._client.gets(key)
            if raw is None or not codec.decode_mark(raw).held_by(owner):
                return False
            result = await self._client.cas(key, raw, token, expire)
            if result is None:
                return False
            if result:
                return True
        raise StoreUnavailable("memcached key too contended to update")

    async def _release_lease(self, key: str, owner: str) -> None:
        freed = codec.encode_mark(codec.Mark(codec.FREE))
        for _ in range(CAS_ATTEMPTS):
            raw, token = await self._client.gets(key)
            if raw is None or not codec.decode_mark(raw).held_by(owner):
                return
            if await self._client.cas(key, freed, token, FREED_LEASE_TTL_S) is not False:
                return
        raise StoreUnavailable("memcached key too contended to update")

    # --- Inbox ----------------------------------------------------------------------------------------

    async def record(self, messages: Sequence[InboundMessage]) -> None:
        by_customer: dict[CustomerRef, list[InboundMessage]] = {}
        for message in messages:
            by_customer.setdefault(message.customer, []).append(message)
        if not by_customer:
            return
        keys = {c: await self._key("inbox", c.open_kfid, c.external_userid) for c in by_customer}
        index_keys = {kf: await self._key("inboxidx", kf) for kf in dict.fromkeys(c.open_kfid for c in keys)}
        # One round trip reads every index and inbox of the batch; the CAS tokens keep the writes safe
        # whatever happens in between.
        found = await self._client.gets_many([*index_keys.values(), *keys.values()])
        # Indexed before the inboxes are written: a crash in between leaves a harmless stale entry, never an
        # unindexed inbox. For customers already indexed this is no write.
        for open_kfid, index_key in index_keys.items():
            users = [c.external_userid for c in keys if c.open_kfid == open_kfid]
            await self._index_add(open_kfid, users, found.get(index_key, ABSENT))
        expire = expire_for(self._done_ttl, now=time.time())
        # Every inbox written at once (pipelined); one that changed since the read goes the usual CAS loop.
        writes: list[tuple[CustomerRef, StoreCommand]] = []
        for customer, batch in by_customer.items():
            key = keys[customer]
            self._inbox_reads.pop(key, None)  # about to change
            raw, token = found.get(key, ABSENT)
            changed = _merged_inbox(customer, batch, expire, raw)
            if changed is not None:
                value, exptime = changed
                command = (
                    StoreCommand("add", key, value, exptime)
                    if raw is None
                    else StoreCommand("cas", key, value, exptime, token)
                )
                writes.append((customer, command))
        if not writes:
            return
        stored = await self._client.store_many([command for _, command in writes])
        for (customer, command), done in zip(writes, stored, strict=True):
            if not done:
                await self._cas_update(
                    command.key, partial(_merged_inbox, customer, by_customer[customer], expire)
                )

    async def pending(self, customer: CustomerRef) -> list[InboundMessage]:
        key = await self._key("inbox", customer.open_kfid, customer.external_userid)
        raw, token = await self._client.gets(key)
        box = _decode_inbox(raw, customer)
        if raw is not None and token is not None and box and len(raw) <= INBOX_READ_MAX_BYTES:
            self._keep_inbox_read(key, (raw, token, box))
        return list(box)

    def _keep_inbox_read(self, key: str, read: InboxRead) -> None:
        reads = self._inbox_reads
        reads.pop(key, None)
        if len(reads) >= INBOX_READS_KEPT:
            del reads[next(iter(reads))]  # the oldest
        reads[key] = read

    async def remove(self, customer: CustomerRef, msgid: str) -> list[InboundMessage]:
        key = await self._key("inbox", customer.open_kfid, customer.external_userid)
        return await self._remove(key, customer, msgid, self._inbox_reads.pop(key, None))

    async def _remove(
        self, key: str, customer: CustomerRef, msgid: str, kept_read: InboxRead | None
    ) -> list[InboundMessage]:
        """remove(); `kept_read`: what pending() read, which saves reading the inbox again if it is still
        current (the CAS says so)."""
        # The index is a hint for recovery passes, which prune customers whose inbox turned out empty
        # (customers_with_pending). Not unindexing here keeps the one index key per kf account out of the
        # hot path: under load every drain rewriting it made CAS retries run out.
        expire = expire_for(self._done_ttl, now=time.time())
        fresh = False
        token: bytes | None
        for attempt in range(CAS_ATTEMPTS):
            if kept_read is not None:
                _, token, box = kept_read
            else:
                if attempt and fresh:
                    # Someone else wrote it in between: step aside for a moment so the writers spread out.
                    await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 10)))
                raw, token = await self._client.gets(key)
                if raw is None:
                    return []
                box, fresh = _decode_inbox(raw, customer), True
            kept_read = None
            kept = [m for m in box if m.msgid != msgid]
            if len(kept) == len(box):
                if fresh:
                    return kept
                continue  # not in what pending() read: only a fresh read may tell it is not there
            # An empty list rather than a delete: a record() racing with us updates it with CAS.
            value = codec.encode_messages(kept)
            if await self._client.cas(key, value, token, expire if kept else EMPTY_INBOX_TTL_S):
                return kept
        raise StoreUnavailable("memcached key too contended to update")

    async def complete(self, message: InboundMessage) -> list[InboundMessage]:
        customer, msgid = message.customer, message.msgid
        mark_key = await self._ledger_key("msg", message.open_kfid, msgid)
        key = await self._key("inbox", customer.open_kfid, customer.external_userid)
        done_expire = expire_for(self._done_ttl, now=time.time())
        kept_read = self._inbox_reads.pop(key, None)
        if kept_read is not None and self._client.node_for(mark_key) == self._client.node_for(key):
            _, token, box = kept_read
            kept = [m for m in box if m.msgid != msgid]
            if len(kept) < len(box):
                # One round trip: the server runs the two in order, so the message is DONE before it leaves
                # the inbox, as with finish() then remove().
                marked, removed = await self._client.store_many(
                    [
                        StoreCommand("set", mark_key, self._done_mark, done_expire),
                        StoreCommand(
                            "cas",
                            key,
                            codec.encode_messages(kept),
                            done_expire if kept else EMPTY_INBOX_TTL_S,
                            token,
                        ),
                    ]
                )
                if not marked:
                    raise StoreUnavailable("memcached did not store a done mark")
                if removed:
                    return kept
                # The inbox changed since pending() read it: read it again.
                return await self._remove(key, customer, msgid, None)
        await self._client.set(mark_key, self._done_mark, done_expire)
        return await self._remove(key, customer, msgid, kept_read)

    async def customers_with_pending(self, open_kfid: str) -> list[CustomerRef]:
        users = _id_list(await self._client.get(await self._key("inboxidx", open_kfid)))
        if not users:
            return []
        keys = {await self._key("inbox", open_kfid, user): user for user in users}
        boxes = await self._client.get_many(list(keys))
        pending = {keys[k] for k, raw in boxes.items() if _decode_inbox(raw, CustomerRef(open_kfid, keys[k]))}
        if stale := set(users) - pending:
            await self._index_discard(open_kfid, stale)
        return [CustomerRef(open_kfid, user) for user in users if user in pending]

    async def _index_add(self, open_kfid: str, users: Sequence[str], read: Read | None = None) -> None:
        def added(raw: bytes | None) -> tuple[bytes, int] | None:
            indexed = _id_list(raw)
            known = set(indexed)
            missing = [u for u in dict.fromkeys(users) if u not in known]
            return (codec.encode_str_list([*indexed, *missing]), 0) if missing else None

        await self._cas_update(await self._key("inboxidx", open_kfid), added, read)

    async def _index_discard(self, open_kfid: str, users: set[str]) -> None:
        """Unindex customers whose inbox looked empty, then re-index any a concurrent record() refilled."""

        def discarded(raw: bytes | None) -> tuple[bytes, int] | None:
            indexed = _id_list(raw)
            kept = [u for u in indexed if u not in users]
            return None if len(kept) == len(indexed) else (codec.encode_str_list(kept), 0)

        await self._cas_update(await self._key("inboxidx", open_kfid), discarded)
        keys = {await self._key("inbox", open_kfid, user): user for user in users}
        boxes = await self._client.get_many(list(keys))
        for key, user in keys.items():
            customer = CustomerRef(open_kfid, user)
            if _decode_inbox(boxes.get(key), customer):
                await self._index_add(open_kfid, [user])

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
            kfs = _id_list(raw)
            return None if open_kfid in kfs else (codec.encode_str_list([*kfs, open_kfid]), 0)

        await self._cas_update(await self._key("kfs"), added)

    async def known_kfs(self) -> list[str]:
        return _id_list(await self._client.get(await self._key("kfs")))

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


def _retrieve(task: asyncio.Task[Generations]) -> None:
    """Mark a shared read's failure as seen, even when every caller waiting for it was cancelled."""
    if not task.cancelled():
        task.exception()


def _id_list(raw: bytes | None) -> list[str]:
    """A stored list of ids; unreadable counts as empty (it is rebuilt by the next update)."""
    if raw is None:
        return []
    try:
        return codec.decode_str_list(raw)
    except codec.UndecodableValue:
        log.warning("ignoring an unreadable id list in memcached")
        return []


def _merged_inbox(
    customer: CustomerRef, batch: list[InboundMessage], expire: int, raw: bytes | None
) -> tuple[bytes, int] | None:
    box = _decode_inbox(raw, customer)
    known = {m.msgid for m in box}
    fresh: list[InboundMessage] = []
    for message in batch:
        if message.msgid not in known:
            known.add(message.msgid)
            fresh.append(message)
    if not fresh:
        return None
    # Stable sort: equal send_times keep the order WeCom returned them in.
    box = sorted([*box, *fresh], key=lambda m: m.send_time)
    if len(box) > INBOX_MAX_MESSAGES:
        log.error(
            "inbox of kf=%s customer=%s is full: dropping its %d oldest messages",
            *_ids(customer),
            len(box) - INBOX_MAX_MESSAGES,
        )
        box = box[-INBOX_MAX_MESSAGES:]
    encoded = codec.encode_messages(box)
    while len(encoded) > INBOX_MAX_BYTES and len(box) > 1:
        log.error("inbox of kf=%s customer=%s is too large: dropping its oldest message", *_ids(customer))
        box = box[1:]
        encoded = codec.encode_messages(box)
    return encoded, expire


def _decode_inbox(raw: bytes | None, customer: CustomerRef) -> list[InboundMessage]:
    if raw is None:
        return []
    try:
        return codec.decode_messages(raw)
    except codec.UndecodableValue:
        log.error("dropping an unreadable inbox kf=%s customer=%s", *_ids(customer))
        return []


def _ids(customer: CustomerRef) -> Iterable[str]:
    return (customer.open_kfid, customer.external_userid)
