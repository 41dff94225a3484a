"""MemcacheClient: the commands against a real memcached, and what it does when a server misbehaves."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

from adapters.outbound.memcached_client import MemcacheClient, StoreCommand
from application.errors import StoreUnavailable
from tests.support.memcached import MemcachedProcess, free_port, start_memcached
from tests.unit.adapters.test_memcached_store import RawSerde

pytestmark = pytest.mark.anyio

SECRET = "wmSecretCustomer"  # stands for a customer id: must never appear in an error message
FAST: dict[str, Any] = {"connect_timeout": 0.2, "timeout": 0.2}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def unique(name: str = "k") -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def trio() -> Iterator[list[MemcachedProcess]]:
    """Three servers shared by this module's tests (each test uses keys of its own)."""
    processes: list[MemcachedProcess] = []
    try:
        processes.extend(start_memcached() for _ in range(3))
        yield processes
    finally:
        for process in processes:
            process.kill()  # nothing in them needs to survive, and SIGTERM takes memcached about a second


@pytest.fixture
def server(trio: list[MemcachedProcess]) -> MemcachedProcess:
    return trio[0]


@pytest.fixture
async def client(server: MemcachedProcess) -> AsyncIterator[MemcacheClient]:
    opened = MemcacheClient([server.server], connect_timeout=1, timeout=1)
    try:
        yield opened
    finally:
        await opened.aclose()


class FakeServer:
    """A loopback TCP server whose connections `handler` serves; counts them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client hung up, or the test is over (a cancelled handler would be logged as an error)
        finally:
            writer.close()
            self._tasks.discard(task)


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[FakeServer]:
    fake = FakeServer(handler)
    server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    fake.address = server.sockets[0].getsockname()[:2]
    try:
        yield fake
    finally:
        server.close()
        for task in list(fake._tasks):
            task.cancel()
        await asyncio.gather(*fake._tasks, return_exceptions=True)
        await server.wait_closed()


async def answer_gets(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delay: float = 0
) -> None:
    """A well-behaved server for `get <key>`: the value of a key is the key, upper-cased."""
    while line := await reader.readline():
        key = line.split()[1]
        await asyncio.sleep(delay)
        writer.write(b"VALUE %b 0 %d\r\n%b\r\nEND\r\n" % (key, len(key), key.upper()))


# --- commands against a real memcached -----------------------------------------------------------------


@pytest.mark.memcached
class TestCommands:
    async def test_get_set_add_delete(self, client: MemcacheClient) -> None:
        key = unique()
        assert await client.get(key) is None
        assert await client.set(key, b"one") is True
        assert await client.get(key) == b"one"
        assert await client.add(key, b"two") is False
        assert await client.get(key) == b"one"
        assert await client.delete(key) is True
        assert await client.delete(key) is False
        assert await client.add(key, b"three", 60) is True
        assert await client.get(key) == b"three"

    async def test_gets_and_cas(self, client: MemcacheClient) -> None:
        key = unique()
        assert await client.gets(key) == (None, None)
        assert await client.cas(key, b"x", b"1") is None  # NOT_FOUND
        await client.set(key, b"v1")
        value, token = await client.gets(key)
        assert value == b"v1" and token is not None and token.isdigit()
        assert await client.cas(key, b"v2", token) is True
        assert await client.cas(key, b"v3", token) is False  # EXISTS: changed since
        assert await client.get(key) == b"v2"
        _, fresh = await client.gets(key)
        assert await client.cas(key, b"v4", int(fresh)) is True

    async def test_incr(self, client: MemcacheClient) -> None:
        key = unique()
        assert await client.incr(key, 1) is None
        await client.add(key, b"0")
        assert await client.incr(key, 1) == 1
        assert await client.incr(key, 5) == 6

    async def test_store_many_runs_set_add_and_cas_in_order_and_answers_each(
        self, client: MemcacheClient
    ) -> None:
        fresh, taken, swapped = unique(), unique(), unique()
        await client.set(taken, b"old")
        await client.set(swapped, b"v1")
        _, token = await client.gets(swapped)
        assert token is not None
        results = await client.store_many(
            [
                StoreCommand("add", fresh, b"a", 60),
                StoreCommand("add", taken, b"b"),
                StoreCommand("cas", swapped, b"v2", 0, token),
                StoreCommand("cas", swapped, b"v3", 0, token),  # the one before changed it
                StoreCommand("cas", unique(), b"x", 0, token),  # NOT_FOUND
                StoreCommand("set", taken, b"new"),
                StoreCommand("set", fresh, b"a2"),  # after the add of the same key: the order holds
            ]
        )
        assert results == [True, False, True, False, None, True, True]
        assert await client.get_many([fresh, taken, swapped]) == {fresh: b"a2", taken: b"new", swapped: b"v2"}
        assert await client.store_many([]) == []

    async def test_store_then_get_reads_after_the_writes(self, client: MemcacheClient) -> None:
        written, absent, kept = unique(), unique(), unique()
        await client.set(kept, b"k")
        assert await client.store_then_get([StoreCommand("set", written, b"w")], [written, absent, kept]) == (
            [True],
            {written: b"w", kept: b"k"},
        )
        assert await client.store_then_get([], [kept]) == ([], {kept: b"k"})
        assert await client.store_then_get([StoreCommand("add", kept, b"x")], []) == ([False], {})

    async def test_store_many_refuses_bad_commands_before_sending(self, client: MemcacheClient) -> None:
        with pytest.raises(StoreUnavailable, match="invalid cas token"):
            await client.store_many([StoreCommand("cas", unique(), b"x", 0, None)])
        with pytest.raises(StoreUnavailable, match="invalid memcached key"):
            await client.store_many([StoreCommand("set", "with space", b"x")])
        with pytest.raises(ValueError, match="set, add and cas"):
            await client.store_many([StoreCommand("append", unique(), b"x")])

    async def test_a_failed_command_in_a_pipeline_raises_and_the_next_command_works(
        self, client: MemcacheClient
    ) -> None:
        first, second = unique(SECRET), unique()
        with pytest.raises(StoreUnavailable, match="SERVER_ERROR") as raised:
            await client.store_many(
                [StoreCommand("set", first, b"x" * (2 * 1024 * 1024)), StoreCommand("set", second, b"y")]
            )
        assert SECRET not in str(raised.value)
        assert await client.get(first) is None
        await client.set(first, b"ok")
        assert await client.get_many([first]) == {first: b"ok"}

    async def test_get_many_answers_only_the_keys_found(self, client: MemcacheClient) -> None:
        keys = [unique() for _ in range(5)]
        for i, key in enumerate(keys[:3]):
            await client.set(key, str(i).encode())
        assert await client.get_many(keys) == {keys[0]: b"0", keys[1]: b"1", keys[2]: b"2"}
        assert await client.get_many([]) == {}
        many = await client.gets_many(keys[:2])
        assert set(many) == set(keys[:2]) and many[keys[0]][0] == b"0"

    @pytest.mark.parametrize("value", [b"", b"END\r\nVALUE x 0 1\r\n", bytes(range(256)) * 4, b"x" * 600_000])
    async def test_any_bytes_round_trip(self, client: MemcacheClient, value: bytes) -> None:
        key = unique()
        await client.set(key, value)
        assert await client.get(key) == value
        assert (await client.gets(key))[0] == value

    async def test_values_are_shared_with_pymemcache_as_flags_0(
        self, client: MemcacheClient, server: MemcachedProcess
    ) -> None:
        """An instance on the previous (pymemcache) version reads and writes the same items."""
        ours, theirs, counter = unique(), unique(), unique()
        raw = Client(server.server, serde=RawSerde(), default_noreply=False, connect_timeout=1, timeout=1)
        try:
            await client.set(ours, b'{"s":"done"}')
            assert raw.get(ours) == (b'{"s":"done"}', 0)
            raw.set(theirs, b"[1,2]")
            assert await client.get(theirs) == b"[1,2]"
            await client.add(counter, b"0")
            raw.incr(counter, 2)
            assert await client.incr(counter, 1) == 3
        finally:
            raw.close()

    async def test_version(self, client: MemcacheClient) -> None:
        assert (await client.version(client.nodes[0]))[:1].isdigit()


# --- several servers ------------------------------------------------------------------------------------


class TestPlacement:
    @pytest.mark.parametrize("count", [2, 3])
    def test_every_key_lands_where_pymemcache_hashclient_puts_it(self, count: int) -> None:
        servers = [("10.0.0.1", 11211), ("10.0.0.2", 11211), ("memcached.internal", 11212)][:count]
        theirs = HashClient(servers)
        ours = MemcacheClient(servers, connect_timeout=1, timeout=1)
        keys = [f"kfdify:1718000000000:msg:wkKF{i % 7}:msg{i}" for i in range(3000)] + ["kfdify:gen"]
        placed = {ours.node_for(key) for key in keys}
        assert placed == {f"{host}:{port}" for host, port in servers}  # every node gets keys
        for key in keys:
            host, port = theirs._get_client(key).server
            assert ours.node_for(key) == f"{host}:{port}"

    @pytest.mark.memcached
    async def test_items_written_by_either_version_are_found_by_the_other(
        self, trio: list[MemcachedProcess]
    ) -> None:
        servers = [process.server for process in trio]
        ours = MemcacheClient(servers, connect_timeout=1, timeout=1)
        theirs = HashClient(servers, serde=RawSerde(), default_noreply=False, connect_timeout=1, timeout=1)
        try:
            keys = [unique() for _ in range(60)]
            for key in keys[:30]:
                await ours.set(key, key.encode())
            for key in keys[30:]:
                theirs.set(key, key.encode())
            assert await ours.get_many(keys) == {key: key.encode() for key in keys}
            assert theirs.get_many(keys) == {key: (key.encode(), 0) for key in keys}
            # Pipelined writes go to each key's own node too.
            assert await ours.store_many([StoreCommand("set", key, b"p" + key.encode()) for key in keys]) == [
                True
            ] * len(keys)
            assert theirs.get_many(keys) == {key: (b"p" + key.encode(), 0) for key in keys}
            stored, found = await ours.store_then_get([StoreCommand("set", keys[0], b"q")], keys)
            assert stored == [True] and found == {
                key: b"q" if key == keys[0] else b"p" + key.encode() for key in keys
            }
        finally:
            theirs.close()
            await ours.aclose()


# --- failures -------------------------------------------------------------------------------------------


class TestFailures:
    async def test_a_stall_mid_reply_times_out_and_the_connection_is_not_reused(self) -> None:
        async def stall_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if fake.connections == 1:
                await reader.readline()
                writer.write(b"VALUE k 0 5\r\nab")
                await asyncio.sleep(10)
            await answer_gets(reader, writer)

        async with fake_server(stall_first) as fake:
            client = MemcacheClient([fake.address], **FAST)
            # The server stalls for 10 s: only the client's own deadline (named in the error) ends the wait.
            with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="did not answer within 0.2 s"):
                await client.get("k")
            assert await client.get("k2") == b"K2"
            assert fake.connections == 2
            await client.aclose()

    @pytest.mark.parametrize(
        ("reply", "error"),
        [
            (b"SERVER_ERROR out of memory storing %b\r\n", r"refused the command \(SERVER_ERROR\)"),
            (b"CLIENT_ERROR bad command line format %b\r\n", r"refused the command \(CLIENT_ERROR\)"),
            (b"ERROR\r\n", r"refused the command \(ERROR\)"),
            (b"HTTP/1.1 400 Bad Request %b\r\n\r\n", "unexpected reply"),
            (b"VALUE other 0 1\r\nA\r\nEND\r\n", "unexpected reply"),  # a key nobody asked for
            (b"VALUE %b 0 1\r\nAB\r\nEND\r\n", "unexpected reply"),  # the data block is longer
            (b"x" * 5000, "unexpected reply"),  # no line end in sight
        ],
    )
    async def test_error_and_garbage_replies_raise_without_the_key_and_close_the_connection(
        self, reply: bytes, error: str
    ) -> None:
        async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if fake.connections == 1:
                line = await reader.readline()
                writer.write(reply.replace(b"%b", line.split()[1]) if b"%b" in reply else reply)
                await asyncio.sleep(10)
            await answer_gets(reader, writer)

        async with fake_server(misbehave) as fake:
            client = MemcacheClient([fake.address], **FAST)
            with pytest.raises(StoreUnavailable, match=error) as raised:
                await client.get(SECRET)
            assert SECRET not in str(raised.value)
            assert await client.get("x") == b"X"
            assert fake.connections == 2
            await client.aclose()

    @pytest.mark.memcached
    async def test_real_server_errors_raise_and_the_next_command_works(self, client: MemcacheClient) -> None:
        key = unique(SECRET)
        with pytest.raises(StoreUnavailable, match="SERVER_ERROR") as raised:
            await client.set(key, b"x" * (2 * 1024 * 1024))  # over the 1 MiB item limit
        assert SECRET not in str(raised.value)
        await client.set(key, b"not a number")
        with pytest.raises(StoreUnavailable, match="CLIENT_ERROR"):
            await client.incr(key, 1)
        assert await client.get(key) == b"not a number"

    async def test_a_pooled_connection_closed_by_the_server_is_retried_transparently(self) -> None:
        async def close_on_second_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if fake.connections == 1:  # as if the server restarted while the connection sat in the pool
                line = await reader.readline()
                writer.write(b"VALUE %b 0 1\r\nA\r\nEND\r\n" % line.split()[1])
                await reader.readline()
                return
            await answer_gets(reader, writer)

        async with fake_server(close_on_second_request) as fake:
            client = MemcacheClient([fake.address], **FAST)
            assert await client.get("a") == b"A"
            assert await client.get("b") == b"B"
            assert fake.connections == 2
            await client.aclose()

    async def test_a_connection_closed_by_the_server_while_idle_is_not_used(self) -> None:
        async def one_command_per_connection(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            line = await reader.readline()
            writer.write(b"VALUE %b 0 1\r\nA\r\nEND\r\n" % line.split()[1])

        async with fake_server(one_command_per_connection) as fake:
            client = MemcacheClient([fake.address], **FAST)
            for key in ("a", "b", "c"):
                assert await client.get(key) == b"A"
                await asyncio.sleep(0.02)
            assert fake.connections == 3
            await client.aclose()

    @pytest.mark.parametrize("partial_reply", [b"", b"VALUE a 0 1\r\n"])
    async def test_a_fresh_connection_closed_before_or_during_the_reply_is_not_retried(
        self, partial_reply: bytes
    ) -> None:
        """Retrying could run a command twice (an `add` would then read as "already there")."""

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(partial_reply)

        async with fake_server(hang_up) as fake:
            client = MemcacheClient([fake.address], **FAST)
            with pytest.raises(StoreUnavailable, match="closed the connection"):
                await client.get("a")
            assert fake.connections == 1
            await client.aclose()

    async def test_an_unreachable_server_fails_fast(self) -> None:
        client = MemcacheClient([("127.0.0.1", free_port())], **FAST)
        with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="unreachable"):
            await client.get(SECRET)
        await client.aclose()

    @pytest.mark.parametrize("key", ["", "with space", "new\nline", "nul\x00", "客户", "x" * 251])
    async def test_invalid_keys_are_refused_before_sending(self, key: str) -> None:
        client = MemcacheClient([("127.0.0.1", free_port())], **FAST)
        with pytest.raises(StoreUnavailable, match="invalid memcached key") as raised:
            await client.set(key, b"v")
        assert key not in str(raised.value) or not key
        await client.aclose()


# --- pool and cancellation ------------------------------------------------------------------------------


class TestPool:
    async def test_at_most_max_pool_size_connections_under_100_concurrent_commands(self) -> None:
        async with fake_server(lambda r, w: answer_gets(r, w, delay=0.002)) as fake:
            client = MemcacheClient([fake.address], connect_timeout=1, timeout=1, max_pool_size=4)
            keys = [f"k{i}" for i in range(100)]
            values = await asyncio.gather(*(client.get(key) for key in keys))
            assert values == [key.upper().encode() for key in keys]
            assert fake.connections == 4
            await client.aclose()

    async def test_waiting_for_a_free_connection_is_bounded_by_the_deadline(self) -> None:
        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)

        async with fake_server(stall) as fake:
            client = MemcacheClient([fake.address], connect_timeout=0.1, timeout=0.2, max_pool_size=1)
            # The server stalls for 10 s: the waiters give up at their deadline (0.1 + 2 * 0.2 s).
            with anyio.fail_after(5):
                results = await asyncio.gather(
                    *(client.get(f"k{i}") for i in range(4)), return_exceptions=True
                )
            assert all(isinstance(r, StoreUnavailable) for r in results)
            await client.aclose()

    async def test_a_command_cancelled_mid_reply_does_not_desync_the_next_one(self) -> None:
        async with fake_server(lambda r, w: answer_gets(r, w, delay=0.05)) as fake:
            client = MemcacheClient([fake.address], connect_timeout=1, timeout=1, max_pool_size=1)
            first = asyncio.create_task(client.get("a"))
            await asyncio.sleep(0.01)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert await client.get("b") == b"B"
            assert fake.connections == 2
            await client.aclose()

    @pytest.mark.memcached
    async def test_cancelling_many_commands_at_random_points_never_mixes_up_answers(
        self, server: MemcachedProcess
    ) -> None:
        client = MemcacheClient([server.server], connect_timeout=1, timeout=1, max_pool_size=4)
        keys = [unique() for _ in range(40)]
        for key in keys:
            await client.set(key, key.encode() * 500)

        async def read_forever(key: str) -> None:
            while True:
                assert await client.get(key) == key.encode() * 500

        for _ in range(5):
            tasks = [asyncio.create_task(read_forever(key)) for key in keys]
            await asyncio.sleep(random.uniform(0.001, 0.02))
            for task in tasks:
                task.cancel()
            for task in tasks:
                with pytest.raises(asyncio.CancelledError):
                    await task
        assert await client.get_many(keys) == {key: key.encode() * 500 for key in keys}
        await client.aclose()


class TestLifecycle:
    @pytest.mark.memcached
    async def test_a_closed_client_refuses_commands(self, server: MemcachedProcess) -> None:
        client = MemcacheClient([server.server], **FAST)
        await client.set(unique(), b"v")
        await client.aclose()
        client.close()  # idempotent
        with pytest.raises(StoreUnavailable, match="state store is closed"):
            await client.get("k")

    async def test_a_command_running_at_close_finishes_and_its_connection_is_closed(self) -> None:
        async with fake_server(lambda r, w: answer_gets(r, w, delay=0.05)) as fake:
            client = MemcacheClient([fake.address], connect_timeout=1, timeout=1)
            running = asyncio.create_task(client.get("a"))
            await asyncio.sleep(0.01)
            await client.aclose()
            assert await running == b"A"
            assert client._pools[client.nodes[0]].idle == []

    @pytest.mark.memcached
    def test_a_second_event_loop_starts_with_fresh_connections(self, server: MemcachedProcess) -> None:
        client = MemcacheClient([server.server], connect_timeout=1, timeout=1)
        key = unique()
        first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
        try:
            first.run_until_complete(client.set(key, b"v"))
            assert second.run_until_complete(client.get(key)) == b"v"
            first.run_until_complete(asyncio.sleep(0))  # let the dropped connection close on its own loop
            second.run_until_complete(client.aclose())
        finally:
            first.close()
            second.close()
