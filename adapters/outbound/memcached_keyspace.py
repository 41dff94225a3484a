"""The Memcached state store's ground floor: its key scheme, expiry, namespace generations, and the two atomic
primitives every role uses (the CAS update loop and the lease). The roles are in memcached_inbox.py and
memcached_store.py.

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
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from adapters.outbound import state_codec as codec
from adapters.outbound.memcached_client import MemcacheClient
from application.errors import StoreUnavailable

# A `gets` result: (value, cas token), or (None, None) when the key is absent.
Read = tuple[bytes, bytes] | tuple[None, None]
ABSENT: Read = (None, None)

MAX_KEY_BYTES = 250
MAX_RELATIVE_TTL_S = 30 * 24 * 3600  # memcached reads a larger exptime as an absolute Unix time
GENERATION_CACHE_S = 1.0
FREED_LEASE_TTL_S = 60
CAS_ATTEMPTS = 40

_SAFE_PART = re.compile(r"[A-Za-z0-9_.-]*")
SAFE_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
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
cached_key = lru_cache(maxsize=16384)(build_key)


def expire_for(ttl_s: float, *, now: float) -> int:
    """Memcached's exptime for a TTL: 0 = never; whole seconds, rounded up; absolute past 30 days."""
    if ttl_s <= 0:
        return 0
    seconds = max(1, math.ceil(ttl_s))
    return int(now) + seconds if seconds > MAX_RELATIVE_TTL_S else seconds


def lease_expire_for(lease_s: float, *, now: float) -> int:
    """A lease lasts at least `lease_s`: whole seconds rounded up (minimum 1) plus one clock tick."""
    return expire_for(max(1, math.ceil(lease_s)) + 1, now=now)


class MemcachedKeyspace:
    """Keys, generations and atomic primitives shared by the store's roles; `MemcachedStateStore.__init__`
    sets the attributes declared here."""

    _prefix: str
    _client: MemcacheClient
    _ledger_gen_key: str
    _data_gen_key: str
    _generation: Generations | None
    _generation_read_at: float
    _generation_read: asyncio.Task[Generations] | None

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
        return cached_key(self._prefix, (await self._current_generation()).data, kind, *parts)

    async def _ledger_key(self, kind: str, *parts: str) -> str:
        """A key `clear()` keeps: message marks and leases, pull leases."""
        return cached_key(self._prefix, (await self._current_generation()).ledger, kind, *parts)

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


def _retrieve(task: asyncio.Task[Generations]) -> None:
    """Mark a shared read's failure as seen, even when every caller waiting for it was cancelled."""
    if not task.cancelled():
        task.exception()
