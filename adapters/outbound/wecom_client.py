"""WeCom's API plumbing for the kf channel: the access token (cached, refreshed before expiry and on
40014/42001, docs/wecom-kf.md §4), signed-in requests with errcode handling, media downloads told apart from
errors by their headers (§7.3), and secrets kept out of logged URLs. `WeComKfChannel` (wecom_api.py) builds
the kf operations on it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import httpx

from adapters.outbound.http_transport import async_client, direct_transport, json_body
from adapters.outbound.outside_text import escape_outside_text as escape_outside_text
from adapters.outbound.wecom_paths import (
    CGI_BIN,
    GETTOKEN,
    MEDIA_GET,
)
from application.errors import MediaTooLarge, WeComError
from domain.media import MediaBlob, bare_type, filename_from_disposition

DEFAULT_API_BASE = "https://qyapi.weixin.qq.com"
# Connections to WeCom of the default client (a given client is used as is).
MAX_CONNECTIONS = 32

# media/get answers an error as JSON (application/json or text/plain) without Content-Disposition, where a
# download always names its file (docs/wecom-kf.md, media/get): the headers decide, never the body's look.
_MEDIA_ERROR_TYPES = frozenset({"application/json", "text/plain"})

# Refresh this long before WeCom's `expires_in` runs out (but keep at least half the lifetime).
TOKEN_REFRESH_MARGIN_S = 300.0
DEFAULT_EXPIRES_IN_S = 7200
# After a config errcode from gettoken, answer from memory for this long: repeated wrong-secret calls can get
# the server's IP blocked for an hour (docs/wecom-kf.md, gettoken; errcode 45009 help text).
CONFIG_ERROR_BACKOFF_S = 30.0

# One logger for the whole WeCom adapter (operators filter on it).
_log = logging.getLogger("adapters.outbound.wecom_api")
_URL_CACHE_SIZE = 256


class WeComClient:
    """The real WeCom kf API. Raises `WeComError`; never puts the secret or the access token in messages."""

    def __init__(
        self,
        *,
        corp_id: str,
        corp_secret: str,
        api_base: str = DEFAULT_API_BASE,
        timeout: float = 10,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        config_error_backoff_s: float = CONFIG_ERROR_BACKOFF_S,
        media_timeout_s: float = 60.0,
    ) -> None:
        self._corp_id = corp_id
        self._secret = corp_secret
        self._base = api_base.rstrip("/") + CGI_BIN
        self._owns_client = client is None
        # Hundreds of concurrent send_msg calls share a bounded pool, every connection kept alive, instead of
        # opening (TLS) connections beyond httpx's default 20 kept alive.
        pool = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
        self._client = (
            client if client is not None else async_client(timeout=httpx.Timeout(timeout), limits=pool)
        )
        # JSON calls skip httpx's request/response layers when the client is our aiohttp one.
        self._direct = direct_transport(self._client)
        self._timeouts = self._client.timeout.as_dict()
        self._clock = clock
        self._config_error_backoff_s = config_error_backoff_s
        self._media_timeout_s = media_timeout_s
        self._token = ""
        self._token_valid_until = 0.0
        self._token_lock = asyncio.Lock()
        self._urls: dict[tuple[object, ...], httpx.URL] = {}
        self._config_error: WeComError | None = None
        self._config_error_until = 0.0
        _install_log_redaction()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- access token ----------------------------------------------------------------------------------

    async def _access_token(self) -> str:
        if self._token and self._clock() < self._token_valid_until:
            return self._token
        async with self._token_lock:  # concurrent callers share one gettoken
            if self._token and self._clock() < self._token_valid_until:
                return self._token
            return await self._fetch_token()

    async def _fetch_token(self) -> str:
        """gettoken; the caller holds `_token_lock`."""
        if self._config_error is not None and self._clock() < self._config_error_until:
            remembered = self._config_error
            raise WeComError(remembered.errcode, remembered.errmsg, api=remembered.api)
        started = self._clock()
        try:
            data = await self._request(
                "GET", GETTOKEN, params={"corpid": self._corp_id, "corpsecret": self._secret}
            )
        except WeComError as exc:
            if exc.is_config_error:
                self._config_error = exc
                self._config_error_until = self._clock() + self._config_error_backoff_s
                _log.error(
                    "WeCom gettoken refused with errcode %s: check corp id, secret and trusted IPs "
                    "(not asking again for %.0f s)",
                    exc.errcode,
                    self._config_error_backoff_s,
                )
            raise
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise WeComError(None, "answer without access_token", api=GETTOKEN)
        expires_in = as_int(data.get("expires_in")) or 0
        if expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN_S
        self._token = token
        self._token_valid_until = started + max(expires_in - TOKEN_REFRESH_MARGIN_S, expires_in / 2)
        self._config_error = None
        _log.info("WeCom access token refreshed (valid %d s)", expires_in)
        return token

    def _invalidate(self, token: str) -> None:
        # Only the token that failed: a concurrent caller may already have fetched a fresh one.
        if self._token == token:
            self._token = ""

    # --- HTTP ------------------------------------------------------------------------------------------

    async def _call(
        self,
        api: str,
        body: Mapping[str, Any] | None,
        *,
        query: Mapping[str, str] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> dict[str, Any]:
        """POST `api` with the access token; on 40014/42001 refresh the token once and retry once."""
        token = await self._access_token()
        try:
            return await self._request(
                "POST", api, params={"access_token": token, **(query or {})}, json=body, files=files
            )
        except WeComError as exc:
            if exc.errcode not in WeComError.TOKEN_ERRCODES:
                raise
            _log.info("WeCom %s rejected the access token (errcode %s): refreshing once", api, exc.errcode)
            self._invalidate(token)
        token = await self._access_token()
        return await self._request(
            "POST", api, params={"access_token": token, **(query or {})}, json=body, files=files
        )

    async def _request(
        self,
        method: str,
        api: str,
        *,
        params: dict[str, str],
        json: Mapping[str, Any] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        response = await self._send(method, api, params=params, json=json, files=files)
        if _log.isEnabledFor(logging.DEBUG):
            outcome = response if isinstance(response, str) else f"HTTP {response.status_code}"
            elapsed_ms = (time.monotonic() - started) * 1000
            _log.debug("WeCom %s %s: %s in %.1f ms", method, api, outcome, elapsed_ms)
        if isinstance(response, str):
            raise WeComError(None, f"{api} unreachable: {response}", api=api)
        if response.status_code >= 400:
            raise WeComError(None, f"{api} answered HTTP {response.status_code}", api=api)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise WeComError(None, f"{api} answered a non-JSON body (HTTP {response.status_code})", api=api)
        self._raise_errcode(api, data, params)
        return data

    def _raise_errcode(self, api: str, data: Mapping[str, Any], params: Mapping[str, str]) -> None:
        errcode = as_int(data.get("errcode")) or 0
        if errcode != 0:
            errmsg = escape_outside_text(self._redact(as_str(data.get("errmsg")), params))
            raise WeComError(errcode, errmsg, api=api)

    async def _send(
        self,
        method: str,
        api: str,
        *,
        params: dict[str, str],
        json: Mapping[str, Any] | None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> httpx.Response | _Answer | str:
        """The response, or the name of the httpx exception class.

        httpx exceptions carry the URL, which holds the token or the secret: only the class name leaves this
        method, and the caller raises outside any except block so the original is not chained either.
        """
        try:
            if self._direct is not None and files is None:
                body = None if json is None else json_body(json)
                status, content = await self._direct.exchange(
                    method,
                    self._url(api, params),
                    body=body,
                    headers=_JSON_HEADERS if body is not None else (),
                    timeout=self._timeouts,
                )
                return _Answer(status, content)
            return await self._client.request(method, self._url(api, params), json=json, files=files)
        except httpx.HTTPError as exc:
            return type(exc).__name__

    def _url(self, api: str, params: Mapping[str, str]) -> httpx.URL:
        """The request URL, parsed and encoded once per API, token and query: a string URL plus params costs
        httpx ~50 us per request to parse and re-encode."""
        key: tuple[object, ...] = (api, *params.items())
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _URL_CACHE_SIZE:  # tokens rotate every 2 h: old ones just go
                self._urls.clear()
            url = self._urls[key] = httpx.URL(self._base + api, params=params)
        return url

    async def _download(self, media_id: str, token: str, max_bytes: int) -> MediaBlob:
        """One `media/get`, streamed: the body stops being read as soon as it passes `max_bytes`."""
        api = MEDIA_GET
        params = {"access_token": token, "media_id": media_id}
        failure = ""
        try:
            with anyio.fail_after(self._media_timeout_s):
                async with self._client.stream("GET", self._base + api, params=params) as response:
                    if response.status_code >= 400:
                        raise WeComError(None, f"{api} answered HTTP {response.status_code}", api=api)
                    content_type = response.headers.get("content-type", "")
                    data = await _read_limited(response, max_bytes)
                    disposition = response.headers.get("content-disposition", "")
        except TimeoutError:
            failure = f"no answer within {self._media_timeout_s:g} s"
        except httpx.HTTPError as exc:
            failure = type(exc).__name__  # never the exception itself: its URL holds the token
        if failure:
            raise WeComError(None, f"{api} unreachable: {failure}", api=api)
        if is_media_error(content_type, disposition):
            error = _json_object(data)
            if error is not None:
                self._raise_errcode(api, error, params)
            raise WeComError(None, f"{api} answered {bare_type(content_type)} without the media", api=api)
        return MediaBlob(
            data=data,
            content_type=content_type or "application/octet-stream",
            filename=filename_from_disposition(disposition),
        )

    @staticmethod
    def _redact(text: str, params: Mapping[str, str]) -> str:
        for name in ("access_token", "corpsecret"):
            value = params.get(name, "")
            if value and value in text:
                text = text.replace(value, "***")
        return text


class _RedactSecretsInUrls(logging.Filter):
    """httpx logs every request URL at INFO ("HTTP Request: POST https://…?access_token=…"): mask the token
    and the secret before any handler sees the record."""

    _pattern = re.compile(r"(access_token|corpsecret)=[^&\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        if "access_token=" in message or "corpsecret=" in message:
            record.msg = self._pattern.sub(r"\1=***", message)
            record.args = None
        return True


def _install_log_redaction() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactSecretsInUrls) for f in logger.filters):
        logger.addFilter(_RedactSecretsInUrls())


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaTooLarge(max_bytes, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise MediaTooLarge(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def is_media_error(content_type: str, disposition: str) -> bool:
    """Whether a media/get answer is WeCom's error rather than the file: a JSON or plain-text type and no
    Content-Disposition. A customer's own .json or .txt file comes with its Content-Disposition, so whatever
    its bytes look like, it is a file."""
    return bare_type(content_type) in _MEDIA_ERROR_TYPES and not disposition.strip()


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def as_str(value: object) -> str:
    return "" if value is None or isinstance(value, dict | list) else str(value)


def as_int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(float(str(value)))
    except (TypeError, ValueError, OverflowError):
        return None


_JSON_HEADERS = (("Content-Type", "application/json"),)


class _Answer:
    """A whole WeCom answer read by `AiohttpTransport.exchange`: what `_request` reads of a response."""

    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)
