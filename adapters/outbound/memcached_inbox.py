"""The Inbox role of the Memcached state store: each customer's pulled, unhandled messages and the index of
customers with pending messages per kf account (see memcached_store.py for round trips and limits)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Collection, Iterable, Sequence
from functools import partial

from adapters.outbound import state_codec as codec
from adapters.outbound.memcached_client import StoreCommand
from adapters.outbound.memcached_keyspace import ABSENT, CAS_ATTEMPTS, MemcachedKeyspace, Read, expire_for
from application.errors import StoreUnavailable
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger(__name__)

# An inbox as pending() read it: value, CAS token, messages.
InboxRead = tuple[bytes, bytes, list[InboundMessage]]

EMPTY_INBOX_TTL_S = 300
INBOX_MAX_MESSAGES = 500
INBOX_MAX_BYTES = 512 * 1024  # memcached's default item size limit is 1 MiB
# pending() keeps what it read (value and CAS token), so the remove() that usually follows can write at once
# instead of reading again; a stale entry costs only that read (the CAS refuses it). Bounded in number, size.
INBOX_READS_KEPT = 1024
INBOX_READ_MAX_BYTES = 8 * 1024


class MemcachedInbox(MemcachedKeyspace):
    """The Inbox port over the keyspace; `MemcachedStateStore.__init__` sets the attributes declared here."""

    _done_ttl: float
    _done_mark: bytes
    _inbox_reads: dict[str, InboxRead]

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
        # A scan between the indexing above and these writes sees the new inboxes still empty and may unindex
        # their customers (customers_with_pending prunes what looks stale and re-indexes only what is refilled
        # by then): nobody would ever look at them again. So the index is read again after the writes, in the
        # same round trip when it lives on the same server (the server runs them in order), and whoever
        # went missing is indexed again.
        commands = [command for _, command in writes]
        nodes = {self._client.node_for(key) for key in index_keys.values()}
        nodes.update(self._client.node_for(command.key) for command in commands)
        recheck = list(index_keys.values()) if len(nodes) == 1 else []
        stored, index_after = await self._client.store_then_get(commands, recheck)
        late: set[str] = set()  # kf accounts with an inbox written after that read
        for (customer, command), done in zip(writes, stored, strict=True):
            if not done:
                late.add(customer.open_kfid)
                await self._cas_update(
                    command.key, partial(_merged_inbox, customer, by_customer[customer], expire)
                )
        for open_kfid, index_key in index_keys.items():
            written = [c.external_userid for c, _ in writes if c.open_kfid == open_kfid]
            if not written:
                continue
            if recheck and open_kfid not in late:
                indexed = set(id_list(index_after.get(index_key)))
                if all(user in indexed for user in written):
                    continue
            await self._index_add(open_kfid, written)

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

    async def customers_with_pending(
        self, open_kfid: str, *, unread: Collection[CustomerRef] = ()
    ) -> list[CustomerRef]:
        users = id_list(await self._client.get(await self._key("inboxidx", open_kfid)))
        if not users:
            return []
        # Customers in `unread` are listed as the index has them: their inboxes are not read (a scan during
        # a burst would otherwise read every waiting customer's inbox every 0.2 s), nor pruned.
        skipped = {c.external_userid for c in unread if c.open_kfid == open_kfid}
        keys = {await self._key("inbox", open_kfid, user): user for user in users if user not in skipped}
        boxes = await self._client.get_many(list(keys)) if keys else {}
        pending = {keys[k] for k, raw in boxes.items() if _decode_inbox(raw, CustomerRef(open_kfid, keys[k]))}
        if stale := set(keys.values()) - pending:
            await self._index_discard(open_kfid, stale)
        return [CustomerRef(open_kfid, user) for user in users if user in pending or user in skipped]

    async def _index_add(self, open_kfid: str, users: Sequence[str], read: Read | None = None) -> None:
        def added(raw: bytes | None) -> tuple[bytes, int] | None:
            indexed = id_list(raw)
            known = set(indexed)
            missing = [u for u in dict.fromkeys(users) if u not in known]
            return (codec.encode_str_list([*indexed, *missing]), 0) if missing else None

        await self._cas_update(await self._key("inboxidx", open_kfid), added, read)

    async def _index_discard(self, open_kfid: str, users: set[str]) -> None:
        """Unindex customers whose inbox looked empty, then re-index any a concurrent record() refilled."""

        def discarded(raw: bytes | None) -> tuple[bytes, int] | None:
            indexed = id_list(raw)
            kept = [u for u in indexed if u not in users]
            return None if len(kept) == len(indexed) else (codec.encode_str_list(kept), 0)

        await self._cas_update(await self._key("inboxidx", open_kfid), discarded)
        keys = {await self._key("inbox", open_kfid, user): user for user in users}
        boxes = await self._client.get_many(list(keys))
        for key, user in keys.items():
            customer = CustomerRef(open_kfid, user)
            if _decode_inbox(boxes.get(key), customer):
                await self._index_add(open_kfid, [user])


def id_list(raw: bytes | None) -> list[str]:
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
