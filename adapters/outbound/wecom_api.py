"""`KfChannel` over the WeCom kf HTTP API (httpx), with a shared access-token cache.

Protocol: docs/wecom-kf.md (gettoken, sync_msg, send_msg, send_msg_on_event, service_state, media/get,
media/upload).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import httpx

from adapters.outbound.http_transport import async_client
from adapters.outbound.outside_text import escape_outside_text as escape_outside_text
from adapters.outbound.wecom_customers import MAX_IDS_PER_CALL, batchget_body, parse_batchget
from adapters.outbound.wecom_messages import parse_sync_item
from adapters.outbound.wecom_paths import (
    CGI_BIN,
    CUSTOMER_BATCHGET,
    GETTOKEN,
    MEDIA_GET,
    MEDIA_UPLOAD,
    SEND_MSG,
    SEND_MSG_ON_EVENT,
    SERVICE_STATE_GET,
    SERVICE_STATE_TRANS,
    SYNC_MSG,
)
from application.errors import MediaTooLarge, WeComError
from application.ports import ServiceState
from domain.customer import CustomerBatch
from domain.media import MediaBlob, bare_type, filename_from_disposition
from domain.messages import CustomerRef, SyncPage

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

_log = logging.getLogger(__name__)
_URL_CACHE_SIZE = 256


class WeComKfChannel:
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

    async def __aenter__(self) -> WeComKfChannel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- KfChannel -------------------------------------------------------------------------------------

    async def sync_messages(
        self, open_kfid: str, *, cursor: str | None, token: str | None, limit: int = 1000
    ) -> SyncPage:
        body: dict[str, Any] = {"limit": limit, "voice_format": 0, "open_kfid": open_kfid}
        if cursor:
            body["cursor"] = cursor
        if token:
            body["token"] = token
        data = await self._call(SYNC_MSG, body)
        msg_list = data.get("msg_list")
        parsed = (parse_sync_item(item) for item in (msg_list if isinstance(msg_list, list) else []))
        # An answer without next_cursor must not send the caller back to the start of the history.
        next_cursor = _as_str(data.get("next_cursor")) or (cursor or "")
        return SyncPage(
            messages=tuple(m for m in parsed if m is not None),
            next_cursor=next_cursor,
            has_more=bool(_as_int(data.get("has_more"))),
        )

    async def send_text(self, customer: CustomerRef, text: str, *, msgid: str) -> str:
        return await self._send_msg(customer, "text", {"content": text}, msgid)

    async def _send_msg(
        self, customer: CustomerRef, msgtype: str, content: dict[str, Any], msgid: str
    ) -> str:
        """`kf/send_msg` of one message; returns WeCom's msgid (ours, echoed, when we named it)."""
        body: dict[str, Any] = {
            "touser": customer.external_userid,
            "open_kfid": customer.open_kfid,
            "msgtype": msgtype,
            msgtype: content,
        }
        if msgid:
            body["msgid"] = msgid
        data = await self._call(SEND_MSG, body)
        return _as_str(data.get("msgid")) or msgid

    async def get_service_state(self, customer: CustomerRef) -> ServiceState:
        body = {"open_kfid": customer.open_kfid, "external_userid": customer.external_userid}
        data = await self._call(SERVICE_STATE_GET, body)
        state = _as_int(data.get("service_state"))
        if state is None:
            raise WeComError(None, "answer without service_state", api=SERVICE_STATE_GET)
        return ServiceState(state=state, servicer_userid=_as_str(data.get("servicer_userid")))

    async def transfer_service_state(
        self, customer: CustomerRef, *, state: int, servicer_userid: str = ""
    ) -> str:
        body: dict[str, Any] = {
            "open_kfid": customer.open_kfid,
            "external_userid": customer.external_userid,
            "service_state": state,
        }
        if servicer_userid:
            body["servicer_userid"] = servicer_userid
        data = await self._call(SERVICE_STATE_TRANS, body)
        return _as_str(data.get("msg_code"))

    async def send_on_event(
        self, code: str, text: str, *, msgid: str, menu: Sequence[tuple[str, str]] = ()
    ) -> str:
        body: dict[str, Any] = {"code": code}
        if msgid:
            body["msgid"] = msgid
        if menu:
            items = [
                {"type": "click", "click": {"id": item_id, "content": content}} for item_id, content in menu
            ]
            body["msgtype"] = "msgmenu"
            body["msgmenu"] = {"head_content": text, "list": items}
        else:
            body["msgtype"] = "text"
            body["text"] = {"content": text}
        data = await self._call(SEND_MSG_ON_EVENT, body)
        return _as_str(data.get("msgid")) or msgid

    async def check_access(self) -> None:
        async with self._token_lock:
            self._token = ""
            await self._fetch_token()

    async def send_image(self, customer: CustomerRef, media_id: str, *, msgid: str) -> str:
        return await self._send_msg(customer, "image", {"media_id": media_id}, msgid)

    async def send_menu(
        self, customer: CustomerRef, head: str, items: Sequence[tuple[str, str]], *, msgid: str
    ) -> str:
        # A msgmenu of click items (docs/wecom-kf.md §6.3); a tapped item comes back as a text with menu_id.
        body = {
            "head_content": head,
            "list": [{"type": "click", "click": {"id": i, "content": c}} for i, c in items],
        }
        return await self._send_msg(customer, "msgmenu", body, msgid)

    async def upload_media(self, kind: str, filename: str, content_type: str, data: bytes) -> str:
        # The part is named `media` and carries the file name the customer sees (docs/wecom-kf.md,
        # media/upload).
        answer = await self._call(
            MEDIA_UPLOAD, None, query={"type": kind}, files={"media": (filename, data, content_type)}
        )
        media_id = _as_str(answer.get("media_id"))
        if not media_id:
            raise WeComError(None, "answer without media_id", api=MEDIA_UPLOAD)
        return media_id

    async def download_media(self, media_id: str, *, max_bytes: int) -> MediaBlob:
        token = await self._access_token()
        try:
            return await self._download(media_id, token, max_bytes)
        except WeComError as exc:
            if exc.errcode not in WeComError.TOKEN_ERRCODES:
                raise
            _log.info("WeCom media/get rejected the access token (errcode %s): refreshing once", exc.errcode)
            self._invalidate(token)
        token = await self._access_token()
        return await self._download(media_id, token, max_bytes)

    # --- CustomerDirectory -----------------------------------------------------------------------------

    async def get_customers(self, external_userids: Sequence[str], *, with_context: bool) -> CustomerBatch:
        """`kf/customer/batchget` (docs/wecom-kf.md §11), at most 100 ids a call."""
        ids = list(dict.fromkeys(external_userids))
        if not ids or len(ids) > MAX_IDS_PER_CALL:
            raise ValueError(f"batchget takes 1 to {MAX_IDS_PER_CALL} ids, not {len(ids)}")
        data = await self._call(CUSTOMER_BATCHGET, batchget_body(ids, with_context=with_context))
        return parse_batchget(data, now=time.time())

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
        expires_in = _as_int(data.get("expires_in")) or 0
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
        errcode = _as_int(data.get("errcode")) or 0
        if errcode != 0:
            errmsg = escape_outside_text(self._redact(_as_str(data.get("errmsg")), params))
            raise WeComError(errcode, errmsg, api=api)

    async def _send(
        self,
        method: str,
        api: str,
        *,
        params: dict[str, str],
        json: Mapping[str, Any] | None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> httpx.Response | str:
        """The response, or the name of the httpx exception class.

        httpx exceptions carry the URL, which holds the token or the secret: only the class name leaves this
        method, and the caller raises outside any except block so the original is not chained either.
        """
        try:
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


def _as_str(value: object) -> str:
    return "" if value is None or isinstance(value, dict | list) else str(value)


def _as_int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(float(str(value)))
    except (TypeError, ValueError, OverflowError):
        return None
