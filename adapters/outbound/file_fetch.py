"""Answer files: downloaded only from Dify's own origin and from the hosts the operator lists.

A Dify answer names its files by URL (docs/dify.md, `message_file` and `message_end`). The URL comes from
the model's tools, so it is hostile: fetched blindly, a file "at" `http://169.254.169.254/...` or at a
service on the LAN would be downloaded and sent to the customer. The rules:

- **Dify's origin** (scheme, host and port of DIFY_API_BASE) is trusted whatever its address: a self-hosted
  Dify often runs on the same host or LAN, and serves the tool files itself.
- **Listed hosts** (`[BOT] FILE_HOSTS`: `host` or `host:port`, for a CDN or object store) are fetched over
  http or https, but connected to only when the address is public: not loopback, private, shared (CGNAT),
  link-local, cloud metadata (169.254.169.254, fd00:ec2::254, 100.100.100.200 are in those ranges),
  unspecified, reserved or multicast. The check runs on the addresses the connection is about to use, after
  DNS (a resolver wraps aiohttp's and drops refused addresses), so a name that answers differently the
  second time (DNS rebinding) gains nothing. IP literals are checked before connecting, in any spelling
  (`0x7f000001`, `2130706433`, `0177.0.0.1`, `[::ffff:127.0.0.1]`).
- **Everything else** is refused without a request.
- **Redirects** are followed by hand, at most MAX_REDIRECTS hops, each to an allowed origin as above.
- **Bounds**: the body is read in chunks up to `max_bytes` (MediaTooLarge beyond), the whole download has
  `total_timeout`, and downloads share their own small connection pool, apart from the chat requests'.

No credentials travel: the app key is never sent with a file request. Proxies from the environment are not
used (a proxy would resolve names itself, out of reach of the address check).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import anyio
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from adapters.outbound.http_transport import AiohttpTransport, shared_ssl_context
from application.errors import ChatEngineError, MediaTooLarge
from domain.media import MediaBlob, filename_from_disposition

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_DEFAULT_PORTS = {"http": 80, "https": 443}
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 ranges that carry an IPv4 address which is the real destination.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_LEGACY_IPV4_CHARS = frozenset("0123456789abcdefx.")


class FileUrlRefused(ChatEngineError):
    """An answer file's URL (or a redirect) names an origin the bot does not fetch from."""

    def __init__(self, message: str) -> None:
        super().__init__("file_url_refused", message, retryable=False)


def ip_literal(host: str) -> _IPAddress | None:
    """The address `host` spells, in any form a resolver would accept (dotted, hex, octal, one or two or
    three parts, bracketed IPv6 with or without a zone); None when it is a name."""
    host = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    if not host:
        return None
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    if not set(host) <= _LEGACY_IPV4_CHARS:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))  # what getaddrinfo and curl accept too
    except OSError:
        return None


def is_public_address(address: _IPAddress | str) -> bool:
    """True when connecting to `address` reaches the public internet, not this host, its LAN or a cloud
    metadata service."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        embedded = None
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None:
            embedded = ip.sixtofour
        if embedded is not None and not is_public_address(embedded):
            return False
        if ip.scope_id:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


def _origin(url: httpx.URL) -> _Origin:
    scheme = url.scheme.lower()
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    return _Origin(scheme, host, url.port or _DEFAULT_PORTS.get(scheme, 0))


def parse_file_hosts(entries: Sequence[str]) -> frozenset[tuple[str, int | None]]:
    """(host, port) pairs from `host` / `host:port` / `[v6]` / `[v6]:port` entries; port None = the default
    port of the URL's scheme. ValueError for an entry that is not one of these."""
    hosts: set[tuple[str, int | None]] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            port_text = rest.removeprefix(":") if bracket and rest.startswith(":") else rest
            if not bracket or (rest and not rest.startswith(":")):
                port_text = "?"
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
        else:
            host, port_text = entry, ""  # a bare IPv6 address, checked below
            if ":" in host and ip_literal(host) is None:
                port_text = "?"
        host = host.lower().rstrip(".")
        valid_port = port_text == "" or (port_text.isdigit() and 0 < int(port_text) < 65536)
        if not host or not valid_port or any(ch in host for ch in "/@?#% \t"):
            raise ValueError(f"FILE_HOSTS entry {raw!r} is not a host or host:port")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError as exc:
            raise ValueError(f"FILE_HOSTS entry {raw!r} is not a valid host name") from exc
        hosts.add((host, int(port_text) if port_text else None))
    return frozenset(hosts)


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver, minus the addresses a listed file host may not have. Dify's own host:port pairs
    are resolved as they are (trusted)."""

    def __init__(self, trusted: frozenset[tuple[str, int]], inner: AbstractResolver | None = None) -> None:
        self._trusted = trusted
        self._inner = inner
        self.refused = 0  # resolutions refused outright: every address was off limits

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        found = await self._inner.resolve(host, port, family)
        if (host.lower().rstrip("."), port) in self._trusted:
            return found
        allowed = [entry for entry in found if is_public_address(entry["host"].split("%", 1)[0])]
        if not allowed:
            self.refused += 1
            log.warning("answer file host %s:%d resolves to no public address: not connected", host, port)
            raise OSError(f"{host} resolves to no address answer files may come from")
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


class _GuardedTransport(AiohttpTransport):
    """The project's aiohttp transport with the guarded resolver and no DNS cache: every new connection's
    addresses are checked when it is made."""

    def __init__(self, *, limits: httpx.Limits, resolver: _GuardedResolver) -> None:
        super().__init__(limits=limits, ssl_context=shared_ssl_context(trust_env=True))
        self._resolver = resolver

    def _open(self) -> aiohttp.ClientSession:
        limit = self._limits.max_connections or 0
        connector = aiohttp.TCPConnector(
            limit=limit,
            limit_per_host=0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._ssl_context,  # SSL_CERT_FILE / SSL_CERT_DIR; no proxies
            resolver=self._resolver,
            use_dns_cache=False,
        )
        self._slots = asyncio.Semaphore(limit) if limit else None
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        )
        return self._session


class AnswerFileFetcher:
    """Downloads the files of a Dify app's answers under the rules of the module docstring."""

    def __init__(
        self,
        *,
        dify_base_url: str,
        file_hosts: Sequence[str] = (),
        connect_timeout: float = 10,
        read_timeout: float = 30,
        total_timeout: float = 60,
        max_connections: int = 4,
        client: httpx.AsyncClient | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """`client` replaces the guarded one (tests over httpx.MockTransport: no address check then);
        `resolver` is the name resolution under the guard (aiohttp's threaded getaddrinfo by default)."""
        self._dify = _origin(httpx.URL(dify_base_url))
        self._hosts = parse_file_hosts(file_hosts)
        self._total_timeout = total_timeout
        self._timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        )
        trusted = frozenset({(self._dify.host, self._dify.port)})
        self.resolver = _GuardedResolver(trusted, resolver)
        self._owns_client = client is None
        if client is None:
            transport = _GuardedTransport(
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
                resolver=self.resolver,
            )
            client = httpx.AsyncClient(
                transport=transport, timeout=self._timeout, trust_env=False, headers={"User-Agent": "kf-dify"}
            )
        self._client = client

    @property
    def hosts(self) -> frozenset[tuple[str, int | None]]:
        """The listed hosts ([BOT] FILE_HOSTS) as (host, port or None for the scheme's default)."""
        return self._hosts

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def check(self, url: httpx.URL) -> None:
        """FileUrlRefused unless `url` is on Dify's origin or on a listed host at an allowed address."""
        scheme = url.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise FileUrlRefused("file URL is not http(s)")
        if url.userinfo:
            raise FileUrlRefused("file URL carries credentials")
        origin = _origin(url)
        if origin == self._dify:
            return
        listed = (origin.host, origin.port) in self._hosts or (
            (origin.host, None) in self._hosts and origin.port == _DEFAULT_PORTS[scheme]
        )
        if not listed:
            raise FileUrlRefused(f"file host {origin.host}:{origin.port} is neither Dify's nor listed")
        literal = ip_literal(origin.host)
        if literal is not None and not is_public_address(literal):
            raise FileUrlRefused(f"file host {origin.host} is not a public address")

    async def fetch(self, url: str, *, max_bytes: int) -> MediaBlob:
        try:
            current = httpx.URL(url)
        except httpx.InvalidURL:
            raise FileUrlRefused("file URL is not a valid URL") from None
        try:
            with anyio.fail_after(self._total_timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    self.check(current)
                    async with self._get(current) as response:
                        if response.has_redirect_location:
                            try:
                                current = current.join(response.headers["location"])
                            except httpx.InvalidURL:
                                raise FileUrlRefused("file redirect to an invalid URL") from None
                            continue
                        if not response.is_success:
                            raise ChatEngineError(
                                f"http_{response.status_code}",
                                f"GET file: HTTP {response.status_code}",
                                status=response.status_code,
                                retryable=response.status_code >= 500,
                            )
                        data = await _read_limited(response, max_bytes)
                        name = filename_from_disposition(response.headers.get("content-disposition", ""))
                        return MediaBlob(
                            data=data,
                            content_type=response.headers.get("content-type", "application/octet-stream"),
                            filename=name or current.path.rsplit("/", 1)[-1],
                        )
                raise FileUrlRefused(f"file URL redirects more than {MAX_REDIRECTS} times")
        except TimeoutError:
            raise ChatEngineError(
                "timeout", f"GET file: no answer within {self._total_timeout:g} s", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc

    @asynccontextmanager
    async def _get(self, url: httpx.URL) -> AsyncIterator[httpx.Response]:
        # No Authorization header: answer files are signed URLs, and the app key stays with Dify's API.
        async with self._client.stream("GET", url, timeout=self._timeout, follow_redirects=False) as response:
            yield response


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    """The body, streamed; MediaTooLarge as soon as it passes `max_bytes` (checks a declared length first)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaTooLarge(max_bytes, int(declared), what="file")
    chunks: list[bytes] = []
    size = 0
    stream = response.aiter_bytes()
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise MediaTooLarge(max_bytes, what="file")
            chunks.append(chunk)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()  # now, not whenever the GC gets to it: the connection is released
    return b"".join(chunks)


def _transport_error(exc: httpx.HTTPError) -> ChatEngineError:
    # Our transport's messages never carry the URL (signed query strings stay out of logs).
    detail = f"GET file: {type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return ChatEngineError("timeout", detail, retryable=True)
    if isinstance(exc, httpx.DecodingError):
        return ChatEngineError("bad_response", detail, retryable=False)
    return ChatEngineError("unreachable", detail, retryable=True)
