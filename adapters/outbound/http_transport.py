"""httpx over aiohttp: the adapters keep httpx's API (design card), the bytes go through aiohttp.

Why: per Dify answer (~30 SSE events from a local fake Dify, client process CPU), httpx's default transport
(httpcore) costs 1.76 ms at 8 answers in flight and 2.86 ms at 100; the same httpx client over aiohttp costs
0.70 / 0.85 ms. WeCom's send_msg and sync_msg pay the same per-request overhead. The `httpx-aiohttp` package
does this too, but its error mapping is wrong for us (every aiohttp.ClientConnectionError, even a server that
disconnects mid-response, becomes httpx.ConnectTimeout; the pool timeout becomes aiohttp's `connect`), so we
own this small transport instead.

How httpx's settings map:
- httpx.Limits: max_connections bounds requests in flight (a semaphore here, so that waiting for a free
  connection is timed by `pool` alone) and aiohttp's TCPConnector limit; keepalive_expiry is aiohttp's
  keepalive_timeout. max_keepalive_connections has no aiohttp equivalent: idle connections stay until expiry.
- request.extensions["timeout"], None = no limit: connect → ClientTimeout.connect/sock_connect (DNS, TCP and
  TLS); read → sock_read (silence while waiting for or reading the response); pool → waiting for a slot;
  write → each chunk of a streamed body or of a body over aiohttp's 64 KiB write buffer (smaller bodies never
  wait for the socket).
- Errors become the httpx class httpcore raises for the same situation (callers classify by class):
  refused / DNS / TLS handshake → ConnectError; connect timeout → ConnectTimeout; no free connection in time
  → PoolTimeout; sock_read → ReadTimeout; stalled upload → WriteTimeout; server closed before the status line
  or mid-body, malformed response → RemoteProtocolError; reset / broken connection → ReadError (WriteError
  while sending); bad scheme or URL → UnsupportedProtocol; a header aiohttp refuses → LocalProtocolError.
  Messages never carry the URL (it may hold an access_token) and aiohttp's exception is not chained.
- httpx decodes Content-Encoding (auto_decompress=False), follows redirects and keeps cookies (aiohttp's jar
  is a DummyCookieJar); aiohttp adds no headers of its own.
- Two calls skip httpx's request and response objects (about half the client CPU of a request, issue #14):
  `exchange` (a whole answer: WeCom's JSON API) and `stream` (an answer read as it arrives: Dify's
  stream). Same pool, limits, timeouts and error classes; no redirects, and no Accept-Encoding is sent.
- Proxies: httpx reads HTTP(S)_PROXY / ALL_PROXY / NO_PROXY only for a client without a transport, so when
  one of them is set `async_client` returns a plain httpx client: proxied deployments keep httpcore exactly
  as before (and its CPU cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import ssl
import urllib.request
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import cast

import aiohttp
import httpx
from yarl import URL

# aiohttp's StreamWriter only waits for the socket once more than this is buffered.
_UNBUFFERED_BODY = 64 * 1024
# httpx sets these itself (or leaves them out on purpose, like Content-Type for raw bytes).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_NO_GUARD = contextlib.nullcontext()
_TimeoutKey = tuple[float | None, float | None]


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends through one aiohttp.ClientSession, opened in the loop of first use."""

    def __init__(
        self,
        *,
        limits: httpx.Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        trust_env: bool = True,
    ) -> None:
        self._limits = limits or httpx.Limits()
        # Made here, at wiring, not at the first request: loading the CA bundle took ~80 ms of the event loop
        # in the middle of a burst's first pull (bench/FINDINGS.md, issue #14).
        self._ssl_context = ssl_context or shared_ssl_context(trust_env=trust_env)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._timeouts: dict[_TimeoutKey, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        limit = self._limits.max_connections or 0
        connector = aiohttp.TCPConnector(
            limit=limit,
            limit_per_host=0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._ssl_context,
        )
        self._slots = asyncio.Semaphore(limit) if limit else None
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,  # proxies are httpx's business (see the module docstring)
        )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme = request.url.scheme
        if scheme not in ("http", "https"):
            detail = f"has an unsupported protocol '{scheme}://'" if scheme else "is missing a protocol"
            raise httpx.UnsupportedProtocol(f"Request URL {detail}.")
        if not request.url.host:
            raise httpx.UnsupportedProtocol("Request URL has no host.")
        session = self._session or self._open()
        timeout: Mapping[str, float | None] = request.extensions.get("timeout", {})
        slots = self._slots
        if slots is not None:
            await _acquire(slots, timeout.get("pool"))
        try:
            response = await self._send(session, request, timeout)
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        version = b"HTTP/1.0" if response.version == aiohttp.HttpVersion10 else b"HTTP/1.1"
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseBody(response, slots),
            extensions={
                "http_version": version,
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def _send(
        self, session: aiohttp.ClientSession, request: httpx.Request, timeout: Mapping[str, float | None]
    ) -> aiohttp.ClientResponse:
        encoding = request.headers.encoding  # what httpx would decode them with; names keep their case
        headers = [(name.decode(encoding), value.decode(encoding)) for name, value in request.headers.raw]
        stream = cast(httpx.AsyncByteStream, request.stream)  # httpx.AsyncClient made sure of it
        body: bytes | AsyncIterable[bytes] | None
        try:
            body = request.content or None
        except httpx.RequestNotRead:  # a stream (multipart upload): aiohttp chunks it unless it is sized
            body = stream
            headers = [item for item in headers if item[0].lower() != "transfer-encoding"]
        write = timeout.get("write")
        upload = None
        if write is not None and body is not None:
            if not isinstance(body, bytes) or len(body) > _UNBUFFERED_BODY:
                body = upload = _TimedUpload(stream, write)
        try:
            async with upload.guard if upload is not None else _NO_GUARD:
                return await session.request(
                    request.method,
                    URL(str(request.url), encoded=True),  # httpx already encoded it: no requoting
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=self._client_timeout(timeout),
                )
        except aiohttp.ClientError as exc:
            raise _translate(exc) from None
        except TimeoutError:
            if upload is None or not upload.guard.expired():
                raise
            raise httpx.WriteTimeout("timed out sending the request body") from None
        except ValueError as exc:  # aiohttp refuses the request as given (a header with CR/LF, …)
            raise httpx.LocalProtocolError(f"invalid request ({type(exc).__name__})") from None
        finally:
            if upload is not None:
                upload.sending = False

    async def exchange(
        self,
        method: str,
        url: httpx.URL,
        *,
        body: bytes | None,
        headers: Sequence[tuple[str, str]],
        timeout: Mapping[str, float | None],
    ) -> tuple[int, bytes]:
        """One request whose whole answer is wanted at once (WeCom's JSON API): status and body, without
        httpx's request and response objects around them (bench/FINDINGS.md, issue #14: httpx's layers
        were about half the client CPU of a WeCom call). The same connections, limits, timeouts and errors
        (httpx classes, no URL in them) as `handle_async_request`; `url` is sent as httpx encoded it."""
        async with self.stream(method, url, body=body, headers=headers, timeout=timeout) as response:
            return response.status_code, await response.aread()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: httpx.URL,
        *,
        body: bytes | None,
        headers: Sequence[tuple[str, str]],
        timeout: Mapping[str, float | None],
    ) -> AsyncIterator[StreamedResponse]:
        """One request whose answer is read as it arrives (Dify's answer stream), without httpx's request
        and response objects (bench/FINDINGS.md, issue #14): the same connections, limits, timeouts and
        errors as `exchange`. Leaving the block frees the connection: back to the pool when the body was
        read to its end, else closed. No Accept-Encoding is sent, so servers answer uncompressed; one that
        compresses anyway is decoded."""
        if url.scheme not in ("http", "https") or not url.host:
            raise httpx.UnsupportedProtocol("Request URL has an unsupported protocol or no host.")
        session = self._session or self._open()
        slots = self._slots
        if slots is not None:
            await _acquire(slots, timeout.get("pool"))
        try:
            try:
                response = await session.request(
                    method,
                    URL(str(url), encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=self._client_timeout(timeout),
                    auto_decompress=True,
                )
            except aiohttp.ClientError as exc:
                raise _translate(exc) from None
            except ValueError as exc:  # aiohttp refuses the request as given (a header with CR/LF, …)
                raise httpx.LocalProtocolError(f"invalid request ({type(exc).__name__})") from None
            try:
                yield StreamedResponse(response)
            finally:
                response.close()  # a no-op once the body was read to its end (aiohttp released it then)
        finally:
            if slots is not None:
                slots.release()

    def _client_timeout(self, timeout: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        connect, read = timeout.get("connect"), timeout.get("read")
        found = self._timeouts.get((connect, read))
        if found is None:
            if len(self._timeouts) >= 64:
                self._timeouts.clear()
            found = aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)
            self._timeouts[(connect, read)] = found
        return found


class StreamedResponse:
    """What `AiohttpTransport.stream` yields: the parts of an httpx.Response the Dify adapter reads, under
    httpx's names; body errors are httpx classes, as they are through httpx."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def reason_phrase(self) -> str:
        return self._response.reason or ""

    @property
    def is_success(self) -> bool:
        return 200 <= self._response.status < 300

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return _chunks(self._response)

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except aiohttp.ClientError as exc:
            raise _translate(exc) from None


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body as it arrives; its errors as httpx classes."""
    read = response.content.readany
    try:
        while chunk := await read():
            yield chunk
    except aiohttp.ClientError as exc:
        raise _translate(exc) from None


@functools.cache
def shared_ssl_context(*, trust_env: bool) -> ssl.SSLContext:
    """The verifying TLS context httpx would make (SSL_CERT_FILE / SSL_CERT_DIR with `trust_env`), made once
    per process and shared by every client's connections: each made its own, tens of ms apiece."""
    return httpx.create_ssl_context(trust_env=trust_env)


def json_body(value: Mapping[str, object]) -> bytes:
    """The body httpx's `json=` sends: compact, UTF-8, not ASCII-escaped."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class _ResponseBody(httpx.AsyncByteStream):
    """The aiohttp response body for httpx; closing it frees the connection slot."""

    def __init__(self, response: aiohttp.ClientResponse, slots: asyncio.Semaphore | None) -> None:
        self._response = response
        self._slots = slots

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _chunks(self._response)

    async def aclose(self) -> None:
        # A fully read body already went back to the pool (aiohttp releases it at EOF, so close() is then a
        # no-op); a body closed early closes its connection, which cannot be reused with unread bytes on it.
        self._response.close()
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


class _TimedUpload:
    """A request body under httpx's write timeout: each chunk must reach the socket within `write` seconds."""

    def __init__(self, chunks: AsyncIterable[bytes], write: float) -> None:
        self._chunks = chunks
        self._write = write
        self.guard = asyncio.timeout(None)  # entered around the request; runs while a chunk is written
        self.sending = True  # False once the request call returned: the guard is gone

    def _arm(self, delay: float | None) -> None:
        if self.sending and not self.guard.expired():
            when = None if delay is None else asyncio.get_running_loop().time() + delay
            self.guard.reschedule(when)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # aiohttp asks for the next chunk once the previous one is written: the timer covers that write.
        async for chunk in self._chunks:
            self._arm(self._write)
            yield chunk
        self._arm(None)


async def _acquire(slots: asyncio.Semaphore, pool: float | None) -> None:
    if pool is None or not slots.locked():
        await slots.acquire()
        return
    try:
        async with asyncio.timeout(pool):
            await slots.acquire()
    except TimeoutError:
        raise httpx.PoolTimeout("timed out waiting for a free connection") from None


def _translate(exc: aiohttp.ClientError) -> httpx.TransportError:
    """The httpx error for an aiohttp one; never its message, which holds the URL."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(f"timed out connecting ({name})")
    if isinstance(exc, aiohttp.ServerTimeoutError):  # SocketTimeoutError: sock_read
        return httpx.ReadTimeout(f"timed out reading the response ({name})")
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS handshake, certificate
        return httpx.ConnectError(f"cannot connect: {_reason(exc.__cause__ or exc)} ({name})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(f"server disconnected without sending a complete response ({name})")
    if isinstance(exc, aiohttp.ClientPayloadError):  # closed mid-body, bad chunk framing
        return httpx.RemoteProtocolError(f"incomplete or malformed response body ({name})")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(f"invalid request URL ({name})")
    if isinstance(exc, aiohttp.ClientResponseError):  # a status line or header aiohttp cannot parse
        return httpx.RemoteProtocolError(f"malformed HTTP response ({name})")
    if isinstance(exc, aiohttp.ClientConnectionResetError):  # writing to a connection already closed
        return httpx.WriteError(f"connection closed while sending the request ({name})")
    if isinstance(exc, aiohttp.ClientConnectionError):
        return httpx.ReadError(f"connection broken: {_reason(exc)} ({name})")
    return httpx.TransportError(f"HTTP request failed ({name})")


def _reason(error: BaseException) -> str:
    """A short, address-free reason: OSError strings from asyncio name the peer's address."""
    if isinstance(error, ssl.SSLError):
        return error.reason or "TLS error"
    if isinstance(error, socket.gaierror):
        return error.strerror or "name resolution failed"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return type(error).__name__


def _proxy_in_environment() -> bool:
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def async_client(
    *,
    timeout: httpx.Timeout,
    limits: httpx.Limits,
    headers: Mapping[str, str] | None = None,
    trust_env: bool = True,
) -> httpx.AsyncClient:
    """The adapters' default httpx client: our aiohttp transport, or httpx's own if a proxy is configured."""
    if trust_env and _proxy_in_environment():
        client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=True)
    else:
        transport = AiohttpTransport(limits=limits, trust_env=trust_env)
        client = httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=trust_env, transport=transport)
        _DIRECT[client] = transport
    # Neither WeCom's API nor Dify's uses cookies, and httpx builds two urllib adapter objects per response
    # to look for them: 30 of the ~80 us httpx spends per request. (Private attribute: should httpx rename it,
    # this assignment does nothing and cookies are merely collected again.)
    client._cookies = _IgnoredCookies()
    return client


# The aiohttp transport of each client `async_client` made, for `AiohttpTransport.exchange`.
_DIRECT: weakref.WeakKeyDictionary[httpx.AsyncClient, AiohttpTransport] = weakref.WeakKeyDictionary()


def direct_transport(client: httpx.AsyncClient) -> AiohttpTransport | None:
    """The aiohttp transport behind `client` when `async_client` made it (None for a proxied client or one
    made elsewhere: then requests go through httpx as usual)."""
    return _DIRECT.get(client)


class _IgnoredCookies(httpx.Cookies):
    """A cookie jar that never stores what a response sets."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None
