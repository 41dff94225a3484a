"""Huge and slow bodies at /webhook: refused with 413/408 in bounded time and memory, the connection closed.

Three levels: the ASGI app called directly (exact control over when and how much body arrives, memory
measured), the app behind a real uvicorn socket in a thread (what a trickling or flooding client really
does, with a raw asyncio client), and the real service process (bootstrap's own uvicorn settings).
"""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.types import Message

from adapters.inbound.wecom_crypto import MAX_BODY_BYTES
from bootstrap import Application
from tests.reliability.hostile_input import InProcess, call_asgi, in_process, notice_xml, signed_callback
from tests.support.containers import fake_application, unit_settings
from tests.support.http_server import serve
from tests.support.raw_http import RawReader, RawWriter, open_raw
from tests.support.service_process import ServiceProcess, write_config
from tests.support.stack import ADMIN_TOKEN, AES_KEY, TOKEN, fake_servers

pytestmark = pytest.mark.anyio

DEADLINE = 0.5
CLOCK_SLACK = 0.01  # uvloop's clock: milliseconds, cached per loop iteration
# For tests that show something happens before the body deadline: a deadline no test waits for, so a loaded
# machine cannot make "at once" look like "at the deadline".
LONG_DEADLINE = 60.0
CHUNK = 16 * 1024


def callback_target() -> tuple[str, bytes]:
    """The request target and body of a valid callback."""
    query, body = signed_callback(notice_xml())
    return "/webhook?" + "&".join(f"{k}={v}" for k, v in query.items()), body


# --- in process: the ASGI app called directly ----------------------------------------------------------


@pytest.fixture
async def app() -> AsyncIterator[InProcess]:
    async with in_process(body_timeout_s=DEADLINE) as running:
        yield running


@pytest.fixture
async def patient_app() -> AsyncIterator[InProcess]:
    """For tests about anything but the deadline: a loaded machine cannot turn their answer into a 408."""
    async with in_process(body_timeout_s=LONG_DEADLINE) as running:
        yield running


def valid_query() -> bytes:
    target, _ = callback_target()
    return target.split("?", 1)[1].encode()


async def test_a_body_that_never_finishes_gets_408_at_the_deadline(
    app: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def stalls() -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"<xml><Encrypt>", "more_body": True}
        await asyncio.sleep(3600)  # never more
        raise AssertionError("unreachable")

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kfdify.webhook"):
        # Within 5 s (the body would never come): the deadline ended the wait, not the body.
        response = await asyncio.wait_for(
            call_asgi(app.container.app(), query=valid_query(), receive=stalls), 5
        )
    assert response.status == 408 and response.headers["connection"] == "close"
    assert time.monotonic() - started >= DEADLINE  # not before the deadline
    assert any("408" in r.getMessage() and "not received within" in r.getMessage() for r in caplog.records)
    await app.settle()
    assert app.pulls == 0


async def test_a_body_trickled_within_the_deadline_is_accepted(patient_app: InProcess) -> None:
    app = patient_app
    target, body = callback_target()
    pieces = [body[i : i + 40] for i in range(0, len(body), 40)]
    delay = DEADLINE / 2 / len(pieces)  # in all about DEADLINE / 2: well within the LONG_DEADLINE

    async def trickles() -> Message:
        await asyncio.sleep(delay)
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    response = await call_asgi(app.container.app(), query=target.split("?", 1)[1].encode(), receive=trickles)
    assert response.status == 200
    await app.settle()
    assert app.pulls == 1


async def test_a_declared_length_over_the_cap_is_refused_without_reading(patient_app: InProcess) -> None:
    app = patient_app
    received = 0

    async def endless() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": True}

    for declared in (MAX_BODY_BYTES + 1, 10**12, 10**40):
        response = await call_asgi(
            app.container.app(),
            query=valid_query(),
            headers=[(b"content-length", str(declared).encode())],
            receive=endless,
        )
        assert response.status == 413 and response.headers["connection"] == "close"
    assert received == 0
    assert app.pulls == 0


@pytest.mark.parametrize("declared", [None, b"100"], ids=["undeclared", "declared small, sends more"])
async def test_an_endless_body_is_cut_at_the_cap_in_bounded_memory(
    patient_app: InProcess, declared: bytes | None
) -> None:
    app = patient_app
    chunk = b"<" * CHUNK
    received = 0

    async def endless() -> Message:
        nonlocal received
        received += len(chunk)
        if received > 1024 * MAX_BODY_BYTES:
            raise AssertionError("the webhook kept reading")
        return {"type": "http.request", "body": chunk, "more_body": True}

    headers = [(b"transfer-encoding", b"chunked")] if declared is None else [(b"content-length", declared)]
    tracemalloc.start()
    try:
        response = await call_asgi(app.container.app(), query=valid_query(), headers=headers, receive=endless)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 413
    assert received <= MAX_BODY_BYTES + CHUNK
    assert peak < 4 * MAX_BODY_BYTES + 512 * 1024, f"peak {peak} bytes"
    assert app.pulls == 0


async def test_a_client_that_goes_away_mid_body_gets_4xx(patient_app: InProcess) -> None:
    app = patient_app
    sent = False

    async def leaves() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"<xml>", "more_body": True}
        return {"type": "http.disconnect"}

    response = await call_asgi(app.container.app(), query=valid_query(), receive=leaves)
    assert response.status == 400
    assert app.pulls == 0


def test_the_deadline_must_be_positive() -> None:
    container = fake_application(unit_settings())
    container.webhook.add_kwargs(body_timeout_s=0)
    with pytest.raises(ValueError, match="positive"):
        container.webhook()


# --- a real socket: uvicorn in a thread, raw asyncio clients ---------------------------------------------


@dataclass
class Served:
    host: str
    port: int
    container: Application

    @property
    def pulls(self) -> int:
        return len(self.container.adapters.world().sync_requests)

    async def connect(self) -> tuple[RawReader, RawWriter]:
        return await open_raw(self.host, self.port)


@contextmanager
def serving(body_timeout_s: float) -> Iterator[Served]:
    # No lifespan in tests.support.http_server.serve: the webhook is told it may accept, which is all the
    # lifecycle's start would change for these tests.
    container = fake_application(unit_settings())
    container.webhook.add_kwargs(body_timeout_s=body_timeout_s, accepting=lambda: True)
    with serve(container.app()) as url:
        host, port = url.removeprefix("http://").split(":")
        yield Served(host, int(port), container)


@pytest.fixture
def served() -> Iterator[Served]:
    with serving(DEADLINE) as running:
        yield running


@pytest.fixture
def served_patiently() -> Iterator[Served]:
    with serving(LONG_DEADLINE) as running:
        yield running


def head(target: str, *headers: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: kf.test", *headers, "", ""]
    return "\r\n".join(lines).encode()


@dataclass
class RawHttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_response(reader: RawReader, timeout: float = 5.0) -> RawHttpResponse:
    async def read() -> RawHttpResponse:
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return RawHttpResponse(status, headers, body)

    return await asyncio.wait_for(read(), timeout)


async def closed_by_server(reader: RawReader, timeout: float = 5.0) -> bool:
    """EOF, or a reset (the server closing with our unread bytes in its buffer): either way, closed."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def close(writer: RawWriter) -> None:
    writer.close()
    with suppress(ConnectionError):
        await writer.wait_closed()


async def test_socket_a_trickling_body_gets_408_and_the_connection_is_closed(served: Served) -> None:
    target, _ = callback_target()
    # Before the head is sent: the server's deadline starts when it has read the head, never before this.
    started = time.monotonic()
    reader, writer = await served.connect()
    writer.write(head(target, "Content-Length: 5000"))
    stop = asyncio.Event()

    async def trickle() -> int:
        sent = 0
        with suppress(ConnectionError):
            while not stop.is_set():
                writer.write(b"x")
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.02)
        return sent

    trickler = asyncio.create_task(trickle())
    try:
        # Within 5 s, though the trickle would take 100 s: bytes arriving do not push the deadline back.
        response = await read_response(reader)
        assert response.status == 408 and response.headers["connection"] == "close"
        # Not before the deadline. The server's loop (uvloop) keeps time in whole milliseconds, read once
        # per loop iteration, so its 0.5 s can end a little before 0.5 s of this clock: CLOCK_SLACK.
        assert time.monotonic() - started >= DEADLINE - CLOCK_SLACK
        # The client goes on trickling: the server has closed the connection all the same.
        assert await closed_by_server(reader)
    finally:
        stop.set()
        await trickler
        await close(writer)
    assert served.pulls == 0


async def test_socket_a_body_that_stops_halfway_gets_408(served: Served) -> None:
    target, body = callback_target()
    reader, writer = await served.connect()
    try:
        writer.write(head(target, f"Content-Length: {len(body)}") + body[: len(body) // 2])
        await writer.drain()
        response = await read_response(reader)
        assert response.status == 408
        assert await closed_by_server(reader)
    finally:
        await close(writer)


# Long enough that the genuine callback is answered well before it even on a loaded machine; short enough
# that the test does not wait long for the slow clients' 408s.
SLOW_CLIENTS_DEADLINE = 3.0


async def test_socket_many_slow_clients_do_not_stop_the_service() -> None:
    with serving(SLOW_CLIENTS_DEADLINE) as served:
        target, _ = callback_target()
        clients = [await served.connect() for _ in range(30)]
        try:
            for _, writer in clients:
                writer.write(head(target, "Content-Length: 1000") + b"<xml>")
                await writer.drain()
            # Meanwhile a genuine callback is served at once.
            reader, writer = await served.connect()
            target_ok, body_ok = callback_target()
            writer.write(head(target_ok, f"Content-Length: {len(body_ok)}") + body_ok)
            await writer.drain()
            assert (await read_response(reader)).status == 200
            # Not queued behind the slow ones: none of them has had its answer yet.
            assert [r.peek_nowait() for r, _ in clients] == [b""] * len(clients)
            await close(writer)
            statuses = await asyncio.gather(*(read_response(r) for r, _ in clients))
            assert {s.status for s in statuses} == {408}
        finally:
            for _, writer in clients:
                await close(writer)


async def test_socket_a_declared_huge_body_is_refused_before_it_is_sent(served_patiently: Served) -> None:
    target, _ = callback_target()
    for extra in ([], ["Expect: 100-continue"]):
        reader, writer = await served_patiently.connect()
        try:
            writer.write(head(target, "Content-Length: 100000000", *extra))
            await writer.drain()
            # 413 at once (read_response gives up long before the body deadline), and no "100 Continue"
            # invited the body.
            response = await read_response(reader)
            assert response.status == 413
            assert await closed_by_server(reader)
        finally:
            await close(writer)


async def test_socket_an_endless_chunked_body_is_cut_off(served: Served) -> None:
    target, _ = callback_target()
    reader, writer = await served.connect()
    offered = 64 * 1024 * 1024
    chunk = f"{CHUNK:x}\r\n".encode() + b"<" * CHUNK + b"\r\n"

    async def flood() -> int:
        sent = 0
        with suppress(ConnectionError):
            while sent < offered:
                writer.write(chunk)
                await writer.drain()
                sent += CHUNK
        return sent

    writer.write(head(target, "Transfer-Encoding: chunked"))
    flooder = asyncio.create_task(flood())
    try:
        try:
            response = await read_response(reader)
        except ConnectionResetError:
            # The server answered 413 and closed with the flood unread in its buffer: TCP then resets, and
            # the reset may discard the answer before we read it. Refused either way.
            pass
        else:
            assert response.status == 413 and response.headers["connection"] == "close"
            assert await closed_by_server(reader)
        sent = await asyncio.wait_for(flooder, 5)
        # The server stopped reading: what went out is the cap plus socket buffers, not the flood.
        assert sent < offered // 4, sent
    finally:
        flooder.cancel()
        with suppress(asyncio.CancelledError):
            await flooder
        await close(writer)
    assert served.pulls == 0
    # And the service is none the worse.
    target, body = callback_target()
    reader, writer = await served.connect()
    try:
        writer.write(head(target, f"Content-Length: {len(body)}") + body)
        assert (await read_response(reader)).status == 200
    finally:
        await close(writer)


# --- the real service process ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_service_process_refuses_huge_bodies_and_closes(tmp_path: Path) -> None:
    with fake_servers() as servers:
        config = write_config(
            tmp_path / "config.ini",
            {
                "CONFIG": {
                    "CORP_ID": servers.wecom.corp_id,
                    "CORP_SECRET": servers.wecom.corp_secret,
                    "TOKEN": TOKEN,
                    "ENCODING_AES_KEY": AES_KEY,
                    "DIFY_API_BASE": servers.dify_url,
                    "DIFY_API_KEY": servers.dify.api_key,
                    "WECOM_API_BASE": servers.wecom_url,
                    "ADMIN_TOKEN": ADMIN_TOKEN,
                }
            },
        )
        service = ServiceProcess(config).start()
        try:
            target = "/webhook?msg_signature=0&timestamp=1&nonce=2"
            reader, writer = await open_raw("127.0.0.1", service.port)
            try:
                writer.write(head(target, "Content-Length: 100000000"))
                await writer.drain()
                assert (await read_response(reader)).status == 413
                assert await closed_by_server(reader)
            finally:
                await close(writer)

            reader, writer = await open_raw("127.0.0.1", service.port)
            try:
                writer.write(head(target, "Transfer-Encoding: chunked"))
                with suppress(ConnectionError):
                    for _ in range(2 * MAX_BODY_BYTES // CHUNK):
                        writer.write(f"{CHUNK:x}\r\n".encode() + b"<" * CHUNK + b"\r\n")
                        await writer.drain()
                with suppress(ConnectionResetError):  # see test_socket_an_endless_chunked_body_is_cut_off
                    assert (await read_response(reader)).status == 413
            finally:
                await close(writer)
            health = await asyncio.to_thread(httpx.get, service.url + "/healthz", timeout=5)
            assert health.status_code == 200
        finally:
            service.stop()
        logs = service.logs()
        assert logs.count("rejected with 413") == 2, logs
        assert "Traceback" not in logs
