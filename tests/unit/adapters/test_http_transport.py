"""AiohttpTransport against real loopback servers that misbehave on purpose: every error maps to the httpx
class httpcore would raise, connections are reused, bounded and released, and bodies arrive intact."""

from __future__ import annotations

import asyncio
import gc
import gzip
import os
import shutil
import socket
import ssl
import struct
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.outbound.http_transport import AiohttpTransport, async_client, direct_transport

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-token"
FAST = httpx.Timeout(0.3)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Received:
    line: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Script = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A loopback HTTP server whose every byte the test decides; counts connections and requests."""

    handler: Handler
    rcvbuf: int = 0
    connections: int = 0
    received: list[Received] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a client closed a connection
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> RawServer:
        sock = socket.socket()
        if self.rcvbuf:  # inherited by accepted sockets: a small window makes the client's sends block
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler ends quietly (Python 3.11 logs a cancelled connection callback)
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> Received:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if h)}
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            body = b""
        self.received.append(received := Received(head[0], headers, body))
        return received

    async def wait_for_eof(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass
        self.closed.set()


def serving(respond: Callable[[Received], bytes | None], **options: Any) -> RawServer:
    """Answers every request on a connection (keep-alive) with respond(request); None closes the connection.
    `closed` is set when the client closes a connection between requests."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                request = await server.read_request(reader)
            except asyncio.IncompleteReadError:
                server.closed.set()
                return
            answer = respond(request)
            if answer is None:
                return
            writer.write(answer)
            await writer.drain()

    server = RawServer(handler, **options)
    return server


def on_request(script: Script) -> RawServer:
    """Runs `script` after reading the first request of each connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await script(server, reader, writer)

    server = RawServer(handler)
    return server


def client(limits: httpx.Limits | None = None, timeout: httpx.Timeout = FAST) -> httpx.AsyncClient:
    transport = AiohttpTransport(limits=limits or httpx.Limits(max_connections=4))
    return httpx.AsyncClient(transport=transport, timeout=timeout)


async def forever(*_: object) -> None:
    await asyncio.sleep(3600)


def assert_clean(error: BaseException) -> None:
    """Callers may log the message: no URL (tokens), no chained aiohttp exception."""
    assert SECRET not in str(error) and "127.0.0.1" not in str(error)
    assert error.__cause__ is None and error.__suppress_context__
    assert type(error).__module__.startswith("httpx")


async def failing_get(server: RawServer) -> httpx.HTTPError:
    async with client() as http:
        with pytest.raises(httpx.HTTPError) as caught:
            await http.get(f"{server.url}/x?access_token={SECRET}")
    assert_clean(caught.value)
    return caught.value


async def failing_stream(server: RawServer) -> httpx.HTTPError:
    """Headers arrive, then the body fails: the error must surface, mapped, while iterating."""
    async with client() as http, http.stream("GET", f"{server.url}/s?access_token={SECRET}") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError) as caught:
            async for _ in response.aiter_bytes():
                pass
    assert_clean(caught.value)
    return caught.value


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


# --- the exchange ---------------------------------------------------------------------------------------


async def test_request_and_response_pass_through_unchanged() -> None:
    def respond(request: Received) -> bytes:
        return b"HTTP/1.1 201 Made Here\r\nX-Echo: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            request.headers.get("x-custom", "").encode(),
            len(request.body),
            request.body,
        )

    async with serving(respond) as server, client() as http:
        response = await http.post(f"{server.url}/p?q=%2F~", content=b"raw body", headers={"X-Custom": "v"})

    assert (response.status_code, response.reason_phrase, response.http_version) == (
        201,
        "Made Here",
        "HTTP/1.1",
    )
    assert response.content == b"raw body" and response.headers["x-echo"] == "v"
    (request,) = server.received
    assert request.line == "POST /p?q=%2F~ HTTP/1.1"  # httpx's encoding, not requoted
    assert request.headers["user-agent"].startswith("python-httpx/")
    assert "content-type" not in request.headers  # aiohttp adds no octet-stream of its own


async def test_a_gzip_body_is_decoded_once() -> None:
    text = "你好, 世界 " * 200
    packed = gzip.compress(text.encode())
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(packed),
        packed,
    )

    async with serving(lambda _: answer) as server, client() as http:
        response = await http.get(server.url)

    assert response.text == text
    assert "gzip" in server.received[0].headers["accept-encoding"]


async def test_redirects_are_left_to_httpx() -> None:
    def respond(request: Received) -> bytes:
        if request.line.startswith("GET /from "):
            return b"HTTP/1.1 302 Found\r\nLocation: /to\r\nContent-Length: 0\r\n\r\n"
        return OK

    async with serving(respond) as server, client() as http:
        assert (await http.get(f"{server.url}/from")).status_code == 302
        followed = await http.get(f"{server.url}/from", follow_redirects=True)

    assert followed.status_code == 200 and [r.status_code for r in followed.history] == [302]


async def test_a_multipart_upload_arrives_intact_and_sized() -> None:
    data = os.urandom(200_000)
    async with serving(lambda _: OK) as server, client() as http:
        request = http.build_request(
            "POST", server.url, files={"file": ("a.bin", data, "image/png")}, data={"u": "1"}
        )
        assert (await http.send(request)).status_code == 200

    (received,) = server.received
    assert received.body == b"".join([part async for part in request.stream])  # type: ignore[union-attr]
    assert data in received.body and received.headers["content-length"] == str(len(received.body))


async def test_a_body_of_unknown_length_is_sent_chunked() -> None:
    parts = [os.urandom(50_000) for _ in range(3)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with serving(lambda _: OK) as server, client() as http:
        assert (await http.post(server.url, content=body())).status_code == 200

    (received,) = server.received
    assert received.headers["transfer-encoding"] == "chunked" and received.body == b"".join(parts)


# --- connections ----------------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection_for_read_and_streamed_responses() -> None:
    async with serving(lambda _: OK) as server, client() as http:
        for _ in range(3):
            assert (await http.get(server.url)).content == b"ok"
        for _ in range(3):
            async with http.stream("GET", server.url) as response:
                assert await response.aread() == b"ok"

    assert (len(server.received), server.connections) == (6, 1)


async def test_concurrent_requests_never_open_more_than_max_connections() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            await server.read_request(reader)
            await asyncio.sleep(0.01)
            writer.write(OK)

    server = RawServer(slow)
    async with server, client(httpx.Limits(max_connections=3)) as http:
        answers = await asyncio.gather(*(http.get(server.url) for _ in range(30)))

    assert all(a.content == b"ok" for a in answers)
    assert (len(server.received), server.connections) == (30, 3)


async def test_closing_a_stream_early_closes_its_connection_and_frees_the_slot() -> None:
    async def endless(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await server.wait_for_eof(reader)

    server = on_request(endless)
    async with server, client(httpx.Limits(max_connections=1)) as http:
        for _ in range(2):  # the second one needs the only slot back
            async with http.stream("GET", server.url) as response:
                assert await anext(response.aiter_bytes()) == b"data: 1\n\n"
        await asyncio.wait_for(server.closed.wait(), 1)

    assert server.connections == 2


async def test_waiting_too_long_for_a_free_connection_is_a_pool_timeout() -> None:
    async with on_request(forever) as server, client(httpx.Limits(max_connections=1)) as http:
        first = asyncio.ensure_future(http.get(server.url, timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout) as caught:
            await http.get(server.url, timeout=httpx.Timeout(5, pool=0.1))
        first.cancel()
        # A cancelled request gives its slot back.
        with pytest.raises(httpx.ReadTimeout):
            await http.get(server.url, timeout=httpx.Timeout(5, pool=0.1, read=0.1))

    assert_clean(caught.value)


async def test_aclose_closes_the_session_without_unclosed_warnings() -> None:
    async with serving(lambda _: OK) as server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            http = client()
            await http.get(server.url)  # opens the session and leaves a kept-alive connection
            await http.aclose()
            await asyncio.wait_for(server.closed.wait(), 1)  # the kept-alive connection was closed
            del http
            gc.collect()

    assert [str(w.message) for w in caught if "nclosed" in str(w.message)] == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_certificates_are_verified(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    trusting = AiohttpTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))

    async with serving(lambda _: OK, tls=tls) as server:
        async with client() as http:  # the default trust store has never heard of this certificate
            with pytest.raises(httpx.ConnectError) as caught:
                await http.get(f"{server.url}/?access_token={SECRET}")
        async with httpx.AsyncClient(transport=trusting) as http:
            assert [(await http.get(server.url)).content for _ in range(2)] == [b"ok", b"ok"]

    assert_clean(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert server.connections == 1  # handshakes that fail never reach the handler: one kept-alive connection


# --- errors ---------------------------------------------------------------------------------------------


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"http://127.0.0.1:{port}/?access_token={SECRET}")
    assert_clean(caught.value)
    assert "Connection refused" in str(caught.value)


async def test_an_unknown_host_is_a_connect_error() -> None:
    async with client(timeout=httpx.Timeout(2)) as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"http://no-such-host.invalid/?access_token={SECRET}")
    assert SECRET not in str(caught.value) and type(caught.value) is httpx.ConnectError


async def test_a_connect_that_hangs_is_a_connect_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once the backlog is full, further SYNs are dropped
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            async with client(timeout=httpx.Timeout(5, connect=0.2)) as http:
                with pytest.raises(httpx.ConnectTimeout) as caught:
                    await http.get(f"http://127.0.0.1:{port}/?access_token={SECRET}")
        finally:
            for filler in fillers:
                filler.close()
    assert_clean(caught.value)


async def test_no_status_line_in_time_is_a_read_timeout() -> None:
    async with on_request(forever) as server:
        assert type(await failing_get(server)) is httpx.ReadTimeout


async def test_a_body_that_stalls_is_a_read_timeout_while_reading() -> None:
    async def stall(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"part"))
        await forever()

    async with on_request(stall) as server:
        assert type(await failing_stream(server)) is httpx.ReadTimeout


async def test_a_timeout_of_none_waits_as_long_as_it_takes() -> None:
    async def late(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(OK)

    async with on_request(late) as server, client(timeout=httpx.Timeout(None)) as http:
        assert (await http.get(server.url)).content == b"ok"


@pytest.mark.parametrize(
    "answer",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Le"],
    ids=["nothing", "half a header"],
)
async def test_a_server_closing_before_the_response_is_a_remote_protocol_error(answer: bytes) -> None:
    async def close(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)

    async with on_request(close) as server:
        assert type(await failing_get(server)) is httpx.RemoteProtocolError


@pytest.mark.parametrize(
    "answer",
    [
        CHUNKED_HEAD + chunk(b"data: 1\n\n") + b"5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
    ],
    ids=["mid-chunked-body", "content-length-longer-than-body"],
)
async def test_a_server_closing_mid_body_is_a_remote_protocol_error_while_reading(answer: bytes) -> None:
    async def close(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    async with on_request(close) as server:
        assert type(await failing_stream(server)) is httpx.RemoteProtocolError


async def test_a_reset_connection_is_a_read_error() -> None:
    async def reset(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST

    async with on_request(reset) as server:
        assert type(await failing_get(server)) is httpx.ReadError


async def test_a_malformed_status_line_is_a_remote_protocol_error() -> None:
    async with serving(lambda _: b"HTTP/1.1 OK-ish\r\n\r\n") as server:
        assert type(await failing_get(server)) is httpx.RemoteProtocolError


async def test_an_upload_the_server_does_not_read_is_a_write_timeout() -> None:
    async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await forever()

    async with RawServer(ignore, rcvbuf=4096) as server, client() as http:
        with pytest.raises(httpx.WriteTimeout) as caught:
            await http.post(f"{server.url}/?access_token={SECRET}", content=b"x" * 32_000_000)
    assert_clean(caught.value)


async def test_a_header_with_a_line_break_is_refused_as_a_local_protocol_error() -> None:
    async with serving(lambda _: OK) as server, client() as http:
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await http.get(f"{server.url}/?access_token={SECRET}", headers={"X-Note": "a\r\nInjected: 1"})
    assert_clean(caught.value)
    assert server.received == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "ws://127.0.0.1/x", "http:///x"])
async def test_a_url_that_is_not_http_is_an_unsupported_protocol(url: str) -> None:
    transport = AiohttpTransport()
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("GET", url))
    await transport.aclose()


# --- the factory ----------------------------------------------------------------------------------------


async def test_the_factory_uses_aiohttp_and_leaves_proxies_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    limits = httpx.Limits(max_connections=2)
    async with async_client(timeout=FAST, limits=limits, headers={"User-Agent": "kf-dify"}) as http:
        assert isinstance(http._transport, AiohttpTransport)

    async with serving(lambda _: OK) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with async_client(timeout=FAST, limits=limits, headers={"User-Agent": "kf-dify"}) as http:
            assert (await http.get("http://wecom.test/cgi-bin/x")).content == b"ok"

    (request,) = proxy.received
    assert request.line == "GET http://wecom.test/cgi-bin/x HTTP/1.1"  # absolute form: sent to the proxy
    assert request.headers["user-agent"] == "kf-dify"


async def test_the_adapters_client_keeps_no_cookies() -> None:
    # Neither WeCom nor Dify uses cookies; the factory's client neither stores nor sends them.
    def respond(request: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=abc; Path=/\r\nContent-Length: 2\r\n\r\nok"

    async with serving(respond) as server:
        http = async_client(timeout=FAST, limits=httpx.Limits(max_connections=2), trust_env=False)
        async with http:
            first = await http.get(f"{server.url}/a")
            await http.get(f"{server.url}/b")
    assert first.headers["set-cookie"].startswith("sid=")
    assert not http.cookies
    assert all("cookie" not in request.headers for request in server.received)


# --- exchange(): a whole answer without httpx's request and response objects (WeCom's JSON calls) ----------


def direct(limits: httpx.Limits | None = None) -> tuple[httpx.AsyncClient, AiohttpTransport]:
    made = async_client(timeout=FAST, limits=limits or httpx.Limits(max_connections=2), trust_env=False)
    transport = direct_transport(made)
    assert transport is not None
    return made, transport


async def exchanged(server: RawServer, body: bytes | None = b'{"a":1}') -> tuple[int, bytes]:
    made, transport = direct()
    async with made:
        url = httpx.URL(f"{server.url}/cgi-bin/kf/send_msg", params={"access_token": SECRET})
        return await transport.exchange(
            "POST",
            url,
            body=body,
            headers=(("Content-Type", "application/json"),),
            timeout=made.timeout.as_dict(),
        )


async def test_exchange_sends_the_body_and_returns_status_and_body() -> None:
    def respond(request: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(request.body), request.body)

    async with serving(respond) as server:
        assert await exchanged(server, '{"text":"中文"}'.encode()) == (200, '{"text":"中文"}'.encode())
    request = server.received[0]
    assert request.headers["content-type"] == "application/json"
    assert request.line == f"POST /cgi-bin/kf/send_msg?access_token={SECRET} HTTP/1.1"


async def test_exchange_errors_are_httpx_classes_without_the_url() -> None:
    async with on_request(forever) as server:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await exchanged(server)
    assert_clean(caught.value)

    async def close(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()

    async with on_request(close) as server:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await exchanged(server)
    assert_clean(caught.value)


async def test_exchange_frees_its_connection_slot_whatever_happens() -> None:
    answers = iter([None, OK, OK, OK])  # the first connection is closed without an answer

    async with serving(lambda _: next(answers)) as server:
        made, transport = direct(httpx.Limits(max_connections=1))
        async with made:
            url = httpx.URL(server.url)
            timeout = made.timeout.as_dict()
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.exchange("POST", url, body=b"{}", headers=(), timeout=timeout)
            for _ in range(3):  # one slot: each would wait for a pool timeout if the slot leaked
                assert await transport.exchange("GET", url, body=None, headers=(), timeout=timeout) == (
                    200,
                    b"ok",
                )


async def test_only_the_factory_clients_have_a_direct_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    async with httpx.AsyncClient() as plain:
        assert direct_transport(plain) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    proxied = async_client(timeout=FAST, limits=httpx.Limits())
    async with proxied:
        assert direct_transport(proxied) is None  # proxies are httpx's business


# --- stream(): an answer read as it arrives without httpx's objects (Dify's answer stream) ----------------


async def test_stream_sends_the_request_as_given_and_yields_the_body_as_it_arrives() -> None:
    async def answer(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: text/event-stream\r\nX-Rate: 7\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await writer.drain()
        await server.closed.wait()  # the second part only once the first was read
        writer.write(chunk("data: 中文\n\n".encode()) + b"0\r\n\r\n")

    server = on_request(answer)
    made, transport = direct()
    async with server, made:
        url = httpx.URL(f"{server.url}/v1/chat-messages")
        headers = (("Authorization", f"Bearer {SECRET}"), ("Content-Type", "application/json"))
        opened = transport.stream("POST", url, body=b'{"q":1}', headers=headers, timeout=FAST.as_dict())
        async with opened as response:
            assert (response.status_code, response.reason_phrase, response.is_success) == (
                201,
                "Created",
                True,
            )
            assert response.headers["content-type"] == response.headers["CONTENT-TYPE"] == "text/event-stream"
            assert response.headers.get("x-rate") == "7"
            parts = response.aiter_bytes()
            assert await anext(parts) == b"data: 1\n\n"
            server.closed.set()
            assert b"".join([part async for part in parts]) == "data: 中文\n\n".encode()

    request = server.received[0]
    assert request.line == "POST /v1/chat-messages HTTP/1.1"
    assert request.body == b'{"q":1}'
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.headers["content-type"] == "application/json"
    assert "accept-encoding" not in request.headers  # so servers answer uncompressed


async def test_stream_decodes_a_body_compressed_all_the_same_and_reads_a_whole_one() -> None:
    packed = gzip.compress("出错了".encode() * 100)
    answer = b"HTTP/1.1 429 Too Many Requests\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(packed),
        packed,
    )
    async with serving(lambda _: answer) as server:
        made, transport = direct()
        async with (
            made,
            transport.stream(
                "GET", httpx.URL(server.url), body=None, headers=(), timeout=FAST.as_dict()
            ) as response,
        ):
            assert (response.status_code, response.is_success) == (429, False)
            assert await response.aread() == "出错了".encode() * 100


async def test_stream_errors_are_httpx_classes_without_the_url() -> None:
    async def stall(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"part"))
        await forever()

    async def cut(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n") + b"5\r\nab")
        await writer.drain()

    for script, expected in ((stall, httpx.ReadTimeout), (cut, httpx.RemoteProtocolError)):
        made, transport = direct()
        async with on_request(script) as server, made:
            url = httpx.URL(f"{server.url}/s", params={"access_token": SECRET})
            async with transport.stream(
                "GET", url, body=None, headers=(), timeout=FAST.as_dict()
            ) as response:
                with pytest.raises(httpx.HTTPError) as caught:
                    async for _ in response.aiter_bytes():
                        pass
        assert type(caught.value) is expected
        assert_clean(caught.value)

    made, transport = direct()
    async with on_request(forever) as server, made:
        url = httpx.URL(f"{server.url}/s", params={"access_token": SECRET})
        with pytest.raises(httpx.ReadTimeout) as before_the_head:
            async with transport.stream("GET", url, body=None, headers=(), timeout=FAST.as_dict()):
                pass
    assert_clean(before_the_head.value)


async def test_stream_left_early_closes_its_connection_and_frees_the_slot_read_to_the_end_reuses_it() -> None:
    async def endless(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await server.wait_for_eof(reader)

    made, transport = direct(httpx.Limits(max_connections=1))
    async with on_request(endless) as server, made:
        for _ in range(2):  # the second one needs the only slot back
            async with transport.stream(
                "GET", httpx.URL(server.url), body=None, headers=(), timeout=FAST.as_dict()
            ) as response:
                assert await anext(response.aiter_bytes()) == b"data: 1\n\n"
        await asyncio.wait_for(server.closed.wait(), 1)
    assert server.connections == 2

    made, transport = direct(httpx.Limits(max_connections=1))
    async with serving(lambda _: OK) as server, made:
        for _ in range(3):
            async with transport.stream(
                "GET", httpx.URL(server.url), body=None, headers=(), timeout=FAST.as_dict()
            ) as response:
                assert b"".join([part async for part in response.aiter_bytes()]) == b"ok"
    assert (server.connections, len(server.received)) == (1, 3)
