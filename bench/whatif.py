"""The service with proposed fixes patched in at run time, to measure them before anyone edits the product:

    python -m bench --what-if pools,wakeup,pull-interval,crypto,memcached-index    (bench/README.md)
    python -m bench.whatif pools,wakeup --config bench/out/<run>/<name>.ini

Each patch mirrors a proposal in bench/FINDINGS.md. They wrap private methods of today's code, so they may
stop applying when that code changes: a patch that cannot find its target fails the start loudly.
Results of a what-if run are labelled as such and must not be mistaken for the product's numbers.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

PULL_MIN_INTERVAL_S = 0.3


WECOM_SLOTS = 16  # WeCom API calls in flight at once (and connections kept)
DIFY_KEEPALIVE = 32  # idle Dify connections kept


def patch_pools() -> None:
    """Bounded httpx pools. httpcore 1.0.x scans its pool on every request start and end, O(connections²)
    (its keep-alive check counts all connections, encode/httpcore#1000) and O(queued × connections) while
    requests wait for a connection. So: WeCom calls go through a semaphore of WECOM_SLOTS with a pool of the
    same size (no queueing inside httpcore, no churn); Dify's pool may open DIFY_CONCURRENCY connections
    (default limit 100 capped it below the setting) and keeps DIFY_KEEPALIVE idle ones."""
    import inspect
    import os

    import httpx

    from adapters.outbound.dify import DifyChatEngine
    from adapters.outbound.wecom_api import WeComKfChannel

    dify_connections = int(os.environ.get("BENCH_DIFY_CONCURRENCY", "400"))
    wecom_init, wecom_send = WeComKfChannel.__init__, WeComKfChannel._send
    dify_init = DifyChatEngine.__init__

    def init_wecom(self: WeComKfChannel, *args: Any, **kwargs: Any) -> None:
        wecom_init(self, *args, **kwargs)
        self._bench_slots = asyncio.Semaphore(WECOM_SLOTS)  # type: ignore[attr-defined]
        if self._owns_client:
            limits = httpx.Limits(max_connections=WECOM_SLOTS, max_keepalive_connections=WECOM_SLOTS)
            self._client = httpx.AsyncClient(timeout=self._client.timeout, limits=limits)

    async def send_wecom(self: WeComKfChannel, *args: Any, **kwargs: Any) -> Any:
        async with self._bench_slots:  # type: ignore[attr-defined]
            return await wecom_send(self, *args, **kwargs)

    def init_dify(self: DifyChatEngine, *args: Any, **kwargs: Any) -> None:
        dify_init(self, *args, **kwargs)
        if self._owns_client:
            limits = httpx.Limits(
                max_connections=dify_connections,
                max_keepalive_connections=min(DIFY_KEEPALIVE, dify_connections),
            )
            old = self._client
            self._client = httpx.AsyncClient(timeout=old.timeout, headers=old.headers, limits=limits)

    WeComKfChannel.__init__ = init_wecom  # type: ignore[method-assign]
    WeComKfChannel._send = send_wecom  # type: ignore[method-assign]
    if "max_connections" in inspect.signature(dify_init).parameters:
        # Since 3bdfd70 the product sizes Dify's pool from DIFY_CONCURRENCY itself.
        print(
            "bench what-if: Dify pool already sized by the product; only WeCom's is patched", file=sys.stderr
        )
        return
    DifyChatEngine.__init__ = init_dify  # type: ignore[method-assign]


def patch_httpcore_linear() -> None:
    """httpcore 1.0.x's AsyncConnectionPool._assign_requests_to_connections with the idle count taken once
    (O(connections) instead of O(connections²) per request start and end), and counting idle connections
    only, as encode/httpcore#1000 and #924 propose. Queued requests are assigned as before. (Measured: no
    gain here; cProfile had overstated the scan, whose calls are tiny. Kept to show that.)"""
    from httpcore._async.connection_pool import AsyncConnectionPool

    def assign(self: Any) -> list[Any]:
        closing = []
        idle = sum(1 for connection in self._connections if connection.is_idle())
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif connection.has_expired():
                idle -= int(connection.is_idle())
                self._connections.remove(connection)
                closing.append(connection)
            elif connection.is_idle() and idle > self._max_keepalive_connections:
                idle -= 1
                self._connections.remove(connection)
                closing.append(connection)
        for pool_request in [request for request in self._requests if request.is_queued()]:
            origin = pool_request.request.url.origin
            available = next(
                (c for c in self._connections if c.can_handle_request(origin) and c.is_available()), None
            )
            if available is not None:
                pool_request.assign_to_connection(available)
            elif len(self._connections) < self._max_connections:
                connection = self.create_connection(origin)
                self._connections.append(connection)
                pool_request.assign_to_connection(connection)
            else:
                idle_connection = next((c for c in self._connections if c.is_idle()), None)
                if idle_connection is not None:
                    self._connections.remove(idle_connection)
                    closing.append(idle_connection)
                    connection = self.create_connection(origin)
                    self._connections.append(connection)
                    pool_request.assign_to_connection(connection)
        return closing

    AsyncConnectionPool._assign_requests_to_connections = assign  # type: ignore[method-assign]


def patch_wakeup() -> None:
    """Dispatcher loops deregister themselves in the same step as their last "anything more?" check, so a
    drain()/notify() arriving after it starts a new loop instead of flagging a loop that already ended."""
    import inspect

    from application.dispatcher import Dispatcher

    if "registry" in inspect.signature(Dispatcher._spawn).parameters:
        print("bench what-if: wakeup already fixed in this commit (3bdfd70); not patched", file=sys.stderr)
        return
    original_drain_loop = Dispatcher._drain_loop
    original_pull_loop = Dispatcher._pull_loop

    async def drain_loop(self: Dispatcher, customer: Any) -> None:
        me = asyncio.current_task()
        try:
            await original_drain_loop(self, customer)
        finally:
            if self._drains.get(customer) is me:
                del self._drains[customer]

    async def pull_loop(self: Dispatcher, open_kfid: str) -> None:
        me = asyncio.current_task()
        try:
            await original_pull_loop(self, open_kfid)
        finally:
            if self._pulls.get(open_kfid) is me:
                del self._pulls[open_kfid]

    def drain(self: Dispatcher, customer: Any) -> None:
        if self._closing:
            return
        if customer in self._drains:
            self._drain_again.add(customer)
            return
        self._drains[customer] = self._spawn(self._drain_loop(customer), lambda: None)  # type: ignore[arg-type]

    def notify(self: Dispatcher, open_kfid: str, token: str = "") -> None:
        if self._closing or not open_kfid:
            return
        if token:
            self._tokens[open_kfid] = token
        if open_kfid in self._pulls:
            self._pull_again.add(open_kfid)
            self._telemetry.count("pulls_coalesced")
            return
        self._pulls[open_kfid] = self._spawn(self._pull_loop(open_kfid), lambda: None)  # type: ignore[arg-type]

    Dispatcher._drain_loop = drain_loop  # type: ignore[method-assign]
    Dispatcher._pull_loop = pull_loop  # type: ignore[method-assign]
    Dispatcher.drain = drain  # type: ignore[method-assign]
    Dispatcher.notify = notify  # type: ignore[method-assign]


def patch_pull_interval() -> None:
    """Consecutive pulls of one kf account start at least PULL_MIN_INTERVAL_S apart: a burst of callbacks
    becomes a few pulls (each pull pages through everything new), a lone callback is pulled at once."""
    from application.dispatcher import Dispatcher
    from application.options import BotOptions

    if "pull_interval_s" in BotOptions.__dataclass_fields__:
        print("bench what-if: pulls already paced by the product (d4cdc11); not patched", file=sys.stderr)
        return
    original = Dispatcher._pull_once
    last_start: dict[str, float] = {}

    async def pull_once(self: Dispatcher, open_kfid: str, token: str) -> bool:
        loop = asyncio.get_running_loop()
        previous = last_start.get(open_kfid)
        if previous is not None:
            wait = previous + PULL_MIN_INTERVAL_S - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        last_start[open_kfid] = loop.time()
        return await original(self, open_kfid, token)

    Dispatcher._pull_once = pull_once  # type: ignore[method-assign]


def patch_crypto() -> None:
    """Callback parsing without defusedxml's per-call parser set-up when the bytes hold no NUL and no `<!`
    other than CDATA openers (no DTD, hence no entities: the stdlib parser is then safe); anything else still
    goes through defusedxml, which refuses it as before. AES-CBC through one cached ECB cipher (CBC
    decryption is ECB decryption XOR the previous ciphertext block) instead of a new cipher per callback."""
    import xml.etree.ElementTree as ElementTree

    from Crypto.Cipher import AES

    from adapters.inbound import wecom_crypto

    guarded = wecom_crypto._parse_xml

    def parse_xml(source: str | bytes, *, what: str) -> Any:
        data = source.encode("utf-8", "surrogatepass") if isinstance(source, str) else source
        # No NUL (UTF-16/32 would hide "<!" from this byte check) and no "<!" outside CDATA openers.
        if b"\x00" in data or b"<!" in data.replace(b"<![CDATA[", b""):
            return guarded(source, what=what)
        try:
            return ElementTree.fromstring(source)
        except Exception:
            return guarded(source, what=what)  # the same refusal as before

    def aes_decrypt(self: Any, data: bytes) -> bytes:
        ecb = self.__dict__.get("_ecb")
        if ecb is None:
            ecb = self.__dict__["_ecb"] = AES.new(self._key, AES.MODE_ECB)
        previous = self._key[:16] + data[:-16]
        plain = int.from_bytes(ecb.decrypt(data), "big") ^ int.from_bytes(previous, "big")
        return plain.to_bytes(len(data), "big")

    wecom_crypto._parse_xml = parse_xml
    wecom_crypto.WeComCrypto._aes_decrypt = aes_decrypt  # type: ignore[method-assign]


def patch_memcached_index() -> None:
    """MemcachedStateStore.remove() leaves the customer in the kf account's `inboxidx` when the inbox empties
    (customers_with_pending() already drops stale entries when it reads the index). The shared index key is
    then only written when a customer is first seen, not around every message: no CAS contention on it."""
    import inspect
    import time
    from functools import partial

    from adapters.outbound import memcached_store as ms
    from adapters.outbound import state_codec as codec

    if "_index_discard" not in inspect.getsource(ms.MemcachedStateStore.remove):
        print("bench what-if: memcached-index already fixed in this code; not patched", file=sys.stderr)
        return

    async def remove(self: Any, customer: Any, msgid: str) -> None:
        key = await self._key("inbox", customer.open_kfid, customer.external_userid)
        expire = ms.expire_for(self._done_ttl, now=time.time())

        def without(raw: bytes | None, *, msgid: str) -> tuple[bytes, int] | None:
            box = ms._decode_inbox(raw, customer)
            kept = [m for m in box if m.msgid != msgid]
            if raw is None or len(kept) == len(box):
                return None
            return codec.encode_messages(kept), expire if kept else ms.EMPTY_INBOX_TTL_S

        await self._cas_update(key, partial(without, msgid=msgid))

    ms.MemcachedStateStore.remove = remove  # type: ignore[method-assign]


def patch_dify_drain() -> None:
    """When the Dify adapter stops reading at `message_end`, the end of the chunked body is still unread, so
    httpcore must drop the connection: a new TCP (in production TLS) connection per answer. Closing the line
    iterator first reads what is left for at most 0.1 s, so the connection goes back to the pool."""
    import anyio
    import httpx

    original = httpx.Response.aiter_lines

    class DrainingLines:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __aiter__(self) -> DrainingLines:
            return self

        async def __anext__(self) -> str:
            line: str = await self._inner.__anext__()
            return line

        async def aclose(self) -> None:
            try:
                with anyio.move_on_after(0.1):
                    async for _ in self._inner:
                        pass
            except Exception:
                pass  # whatever happens, the connection is simply not reused
            await self._inner.aclose()

    def aiter_lines(self: httpx.Response) -> Any:
        return DrainingLines(original(self))

    httpx.Response.aiter_lines = aiter_lines  # type: ignore[method-assign]


def patch_gc_freeze() -> None:
    """gc.freeze() just before uvicorn serves: the ~65k objects of the imports and the container move to the
    permanent generation, so a full collection no longer walks them (about 45 ms each on this machine, a
    pause of the event loop that lands in the webhook's p99)."""
    import gc

    import uvicorn

    original = uvicorn.run

    def run(*args: Any, **kwargs: Any) -> None:
        gc.collect()
        gc.freeze()
        original(*args, **kwargs)

    uvicorn.run = run


def patch_gc_log() -> None:
    """Diagnostic, not a fix: at exit, print how many collections of each generation ran and how long the
    event loop stood still for them (to the service log)."""
    import atexit
    import gc
    import time

    started: dict[str, float] = {}
    totals: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            totals[info["generation"]].append(time.perf_counter() - started.pop("t"))

    def report() -> None:
        for generation, pauses in totals.items():
            if pauses:
                print(
                    f"bench gc-log: generation {generation}: {len(pauses)} collections, "
                    f"total {1000 * sum(pauses):.0f} ms, longest {1000 * max(pauses):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )

    gc.callbacks.append(callback)
    atexit.register(report)


PATCHES: dict[str, Callable[[], None]] = {
    "pools": patch_pools,
    "httpcore-linear": patch_httpcore_linear,
    "wakeup": patch_wakeup,
    "pull-interval": patch_pull_interval,
    "crypto": patch_crypto,
    "memcached-index": patch_memcached_index,
    "dify-drain": patch_dify_drain,
    "gc-freeze": patch_gc_freeze,
    "gc-log": patch_gc_log,
}


def apply(names: str) -> list[str]:
    applied = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in PATCHES:
            raise SystemExit(f"unknown what-if patch {name!r}; one of {', '.join(PATCHES)}")
        PATCHES[name]()
        applied.append(name)
    return applied


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main() -> int:
    import signal

    names, argv = sys.argv[1], sys.argv[2:]
    apply(names)
    import bootstrap  # ROOT is on PYTHONPATH (bench.common.clean_env)

    # uvicorn re-raises SIGTERM after its graceful shutdown: exit through SystemExit so atexit runs (gc-log).
    signal.signal(signal.SIGTERM, _exit)
    try:
        return bootstrap.main(argv)
    except SystemExit:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
