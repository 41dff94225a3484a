"""An asyncio memcached client (text protocol) with the commands the state store uses.

Not pymemcache on threads (as before): the thread hop and `asyncio.wait_for` cost 110-155 µs of CPU per `get`
(18 µs for the call made directly), more under load, when the threads fight the event loop for the GIL. Not
aiomcache: it talks to one server, has no timeouts, and pools a connection after a cancelled command
(CancelledError is no Exception), so the next command on it reads the previous answer.

- Placement: a key goes to the node pymemcache's `RendezvousHash` picks over ``"host:port"`` names, as
  pymemcache's `HashClient` (used by earlier versions) does, so old and new instances agree during a rolling
  upgrade. No failover: a key never moves to another node.
- Pool: at most `max_pool_size` connections per server; a command waits for a free one within its deadline.
- Timeouts: a command (waiting for a connection, connecting, sending, reading) takes at most
  `connect_timeout + 2 * timeout`; connecting at most `connect_timeout`; once the request is sent, the server
  has `timeout` for each piece of the reply (as with pymemcache's socket timeouts).
- A connection is pooled again only after a complete, well-formed reply. After a timeout, cancellation, error
  line, malformed reply or I/O error it is closed: no command can read another one's answer.
- A pooled connection found closed by the server (EOF, reset or broken pipe before any reply byte: it
  restarted since) is retried on another connection, at most `max_pool_size` times.
- Every failure raises `StoreUnavailable`, whose message never holds a key or a value.

Values are bytes with flags 0 (as pymemcache stores bytes); results follow pymemcache: get → bytes | None,
gets → (bytes, cas) | (None, None), cas → True | False (EXISTS) | None (NOT_FOUND), incr → int | None.

`store_many` pipelines several set/add/cas commands: one write and one read per server instead of one round
trip each. A server runs the commands it gets on one connection in the order sent; commands for different
servers run concurrently. A failure raises `StoreUnavailable` for the whole batch, and then any of its
commands may or may not have run.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from typing import cast

from pymemcache.client.rendezvous import RendezvousHash

from adapters.outbound.memcached_protocol import (
    CAS,
    CAS_REPLIES,
    DELETE,
    INCR,
    STORE,
    STORE_REPLIES,
    VERSION,
    Found,
    Parser,
    StoreCommand,
    T,
    encode_key,
    parse_statuses_then_values,
    parse_values,
    store_request,
)
from application.errors import StoreUnavailable

__all__ = ["MemcacheClient", "StoreCommand"]


class _Closed(Exception):
    """The server closed the connection; `before_reply`: before sending any byte of the reply."""

    def __init__(self, before_reply: bool, reason: str) -> None:
        super().__init__(reason)
        self.before_reply = before_reply


class _Connection(asyncio.Protocol):
    """One connection: a receive buffer, at most one request in flight, and when its reply is due."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lost: str | None = None  # why the connection ended, once it did
        self.due = 0.0  # loop time by which the next reply bytes must arrive
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports (uvicorn picks uvloop when it is installed) implement
        # the Transport interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.lost = self.lost or "EOF"
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or (type(exc).__name__ if exc else "EOF")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def reusable(self) -> bool:
        assert self.transport is not None
        return self.lost is None and not self.buffer and not self.transport.is_closing()

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def abort(self, reason: str = "aborted") -> None:
        self.lost = self.lost or reason
        self._wake()
        if self.transport is not None:
            try:
                self.transport.abort()
            except RuntimeError:  # its event loop is closed already; the transport's finalizer closes it
                pass


_TIMED_OUT = "timeout"


class _Pool:
    """Connections to one server: idle ones, and a semaphore bounding the ones in use."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(size)

    def take(self) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()
            if connection.reusable:
                return connection
            connection.abort()
        return None

    def drop_idle(self) -> None:
        for connection in self.idle:
            connection.abort()
        self.idle.clear()


class MemcacheClient:
    """The commands the state store uses, on one or more memcached servers (see the module docstring)."""

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        connect_timeout: float,
        timeout: float,
        max_pool_size: int = 16,
    ) -> None:
        if not servers:
            raise ValueError("at least one memcached server is needed")
        if max_pool_size < 1:
            raise ValueError("max_pool_size must be at least 1")
        # Named like pymemcache's HashClient names its nodes: the names are part of the key placement.
        self._pools = {f"{host}:{port}": _Pool(host, port, max_pool_size) for host, port in servers}
        self.nodes = tuple(self._pools)
        self.node_for: Callable[[str], str]
        if len(self.nodes) > 1:
            # RendezvousHash scores every node per key in pure Python (~9 µs each): remember recent keys.
            self.node_for = lru_cache(maxsize=8192)(RendezvousHash(list(self.nodes)).get_node)
        else:
            self.node_for = partial(_only, self.nodes[0])
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._deadline = connect_timeout + 2 * timeout
        self._stale_retries = max_pool_size
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Replies are timed by one sweeper that runs while any is awaited (a timer per command costs ~5 µs).
        self._awaiting: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = max(0.005, min(0.1, timeout / 10))

    # --- commands -------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        hit = await self._retrieve_one(b"get", key)
        return None if hit is None else hit[0]

    async def gets(self, key: str) -> tuple[bytes, bytes] | tuple[None, None]:
        hit = await self._retrieve_one(b"gets", key)
        return (None, None) if hit is None else (hit[0], hit[1] or b"")

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        return {key: value for key, (value, _) in (await self._retrieve(b"get", keys)).items()}

    async def gets_many(self, keys: Iterable[str]) -> dict[str, tuple[bytes, bytes]]:
        return {
            key: (value, cas or b"") for key, (value, cas) in (await self._retrieve(b"gets", keys)).items()
        }

    async def set(self, key: str, value: bytes, expire: int = 0) -> bool:
        return await self._store(b"set", key, value, expire, b"", STORE)

    async def add(self, key: str, value: bytes, expire: int = 0) -> bool:
        return await self._store(b"add", key, value, expire, b"", STORE)

    async def cas(self, key: str, value: bytes, cas: bytes | int | None, expire: int = 0) -> bool | None:
        """`cas`: the token `gets` answered (None, for an absent key, is refused)."""
        token = str(cas).encode() if isinstance(cas, int) else cas
        if not token or not token.isdigit():
            raise StoreUnavailable("invalid cas token")
        return await self._store(b"cas", key, value, expire, b" " + token, CAS)

    async def store_many(self, commands: Sequence[StoreCommand]) -> list[bool | None]:
        """Pipelined set/add/cas (see the module docstring); each result as `set`, `add` or `cas` answers."""
        return (await self.store_then_get(commands, ()))[0]

    async def store_then_get(
        self, commands: Sequence[StoreCommand], keys: Iterable[str]
    ) -> tuple[list[bool | None], dict[str, bytes]]:
        """`store_many(commands)`, then `get_many(keys)`, pipelined: each server gets its share of the
        commands and then of the keys in one write, and answers in one read."""
        batches: dict[str, tuple[list[int], list[bytes]]] = {}
        for index, command in enumerate(commands):
            batches.setdefault(self.node_for(command.key), ([], []))[0].append(index)
        for key in keys:
            batches.setdefault(self.node_for(key), ([], []))[1].append(encode_key(key))
        requests = [store_request(command) for command in commands]
        results: list[bool | None] = [None] * len(commands)
        found: dict[str, bytes] = {}

        async def run(node: str, indexes: list[int], wanted: list[bytes]) -> None:
            replies = [CAS_REPLIES if commands[i].verb == "cas" else STORE_REPLIES for i in indexes]
            request = b"".join(requests[i] for i in indexes)
            if wanted:
                request += b"get %b\r\n" % b" ".join(wanted)
            parse = partial(parse_statuses_then_values, replies, set(wanted) if wanted else None)
            answers, values = await self._call(node, request, parse)
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer
            found.update((key.decode(), value) for key, (value, _) in values.items())

        runs = [run(node, indexes, wanted) for node, (indexes, wanted) in batches.items()]
        if len(runs) == 1:
            await runs[0]
        elif runs:
            await asyncio.gather(*runs)
        return results, found

    async def delete(self, key: str) -> bool:
        return await self._call(self.node_for(key), b"delete %b\r\n" % encode_key(key), DELETE)

    async def incr(self, key: str, delta: int) -> int | None:
        return await self._call(self.node_for(key), b"incr %b %d\r\n" % (encode_key(key), delta), INCR)

    async def decr(self, key: str, delta: int) -> int | None:
        """Memcached's `decr`: the new value (never below 0), None when the key is absent."""
        return await self._call(self.node_for(key), b"decr %b %d\r\n" % (encode_key(key), delta), INCR)

    async def version(self, node: str) -> str:
        return await self._call(node, b"version\r\n", VERSION)

    # --- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse further commands and close idle connections; busy ones close when their command ends."""
        self._closed = True
        for pool in self._pools.values():
            pool.drop_idle()

    async def aclose(self) -> None:
        self.close()
        await asyncio.sleep(0)  # let the aborted transports close their sockets

    # --- plumbing -------------------------------------------------------------------------------------

    async def _retrieve_one(self, verb: bytes, key: str) -> tuple[bytes, bytes | None] | None:
        encoded = encode_key(key)
        parse = partial(parse_values, verb == b"gets", (encoded,))
        return (await self._call(self.node_for(key), b"%b %b\r\n" % (verb, encoded), parse)).get(encoded)

    async def _retrieve(self, verb: bytes, keys: Iterable[str]) -> dict[str, tuple[bytes, bytes | None]]:
        batches: dict[str, list[bytes]] = {}
        for key in keys:
            batches.setdefault(self.node_for(key), []).append(encode_key(key))
        parse = partial(parse_values, verb == b"gets")
        calls = [
            self._call(node, b"%b %b\r\n" % (verb, b" ".join(batch)), partial(parse, set(batch)))
            for node, batch in batches.items()
        ]
        found: list[Found] = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        return {key.decode(): hit for node_found in found for key, hit in node_found.items()}

    async def _store(
        self, verb: bytes, key: str, value: bytes, expire: int, extra: bytes, parse: Parser[T]
    ) -> T:
        if not isinstance(value, bytes):
            raise StoreUnavailable("memcached values must be bytes")
        header = b"%b %b 0 %d %d%b\r\n" % (verb, encode_key(key), expire, len(value), extra)
        return await self._call(self.node_for(key), b"".join((header, value, b"\r\n")), parse)

    async def _call(self, node: str, request: bytes, parse: Parser[T]) -> T:
        if self._closed:
            raise StoreUnavailable("state store is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        pool = self._pools[node]
        deadline = loop.time() + self._deadline
        if pool.slots.locked():  # every connection is busy: wait for one, within the deadline
            try:
                async with asyncio.timeout_at(deadline):
                    await pool.slots.acquire()
            except TimeoutError:
                raise StoreUnavailable(f"no memcached connection free within {self._deadline:g} s") from None
        else:
            await pool.slots.acquire()  # returns at once
        try:
            return await self._exchange(pool, request, parse, deadline)
        finally:
            pool.slots.release()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connections, semaphores and timers belong to one event loop: start afresh on another one."""
        if self._loop is not None:
            for pool in self._pools.values():
                pool.drop_idle()
                pool.slots = asyncio.Semaphore(pool.size)
            self._awaiting.clear()
            self._sweeper = None
        self._loop = loop

    async def _exchange(self, pool: _Pool, request: bytes, parse: Parser[T], deadline: float) -> T:
        for attempt in range(self._stale_retries + 1):
            if self._closed:
                raise StoreUnavailable("state store is closed")
            connection = pool.take()
            reused = connection is not None
            if connection is None:
                connection = await self._connect(pool, deadline)
            try:
                result = await self._request(connection, request, parse, deadline)
            except _Closed as exc:
                connection.abort()
                if reused and exc.before_reply and attempt < self._stale_retries:
                    pool.drop_idle()  # opened before the server closed this one: probably closed too
                    continue
                where = "before replying" if exc.before_reply else "mid-reply"
                raise StoreUnavailable(f"memcached closed the connection {where} ({exc})") from None
            except BaseException:
                connection.abort()  # never reuse a connection with a reply still (maybe) on its way
                raise
            if self._closed:
                connection.abort()
            else:
                pool.idle.append(connection)
            return result
        raise AssertionError("unreachable")

    async def _request(self, connection: _Connection, request: bytes, parse: Parser[T], deadline: float) -> T:
        """Send `request` and parse its reply, which must keep coming: `timeout` s at most between bytes."""
        assert self._loop is not None and connection.transport is not None
        if connection.lost is None:
            connection.transport.write(request)
        connection.due = min(deadline, self._loop.time() + self._timeout)
        self._awaiting.add(connection)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        try:
            while True:
                parsed = parse(connection.buffer)
                if parsed is not None:
                    result, used = parsed
                    del connection.buffer[:used]
                    return result
                if connection.lost == _TIMED_OUT:
                    raise StoreUnavailable(f"memcached did not answer within {self._timeout:g} s")
                if connection.lost is not None:
                    raise _Closed(not connection.buffer, connection.lost)
                await connection.wait()
                connection.due = min(deadline, self._loop.time() + self._timeout)
        finally:
            self._awaiting.discard(connection)

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for connection in [c for c in self._awaiting if c.due <= now]:
            connection.abort(_TIMED_OUT)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep) if self._awaiting else None

    async def _connect(self, pool: _Pool, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
                transport, connection = await loop.create_connection(_Connection, pool.host, pool.port)
        except TimeoutError:
            raise StoreUnavailable(
                f"memcached did not accept a connection within {self._connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"memcached unreachable ({type(exc).__name__}: {exc})") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection


def _only(node: str, key: str) -> str:
    return node
