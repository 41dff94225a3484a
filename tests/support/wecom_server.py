"""A fake WeCom kf HTTP API (Starlette), driving the same `KfWorld` as `FakeKfChannel`.

Serve `.app` with `tests.support.http_server.serve` (real HTTP) or `httpx.ASGITransport` (in-process).
Rules come from docs/wecom-kf.md: errcodes ride on HTTP 200 JSON bodies, `access_token` lives in the
query string.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.outbound.fake_wecom import KfWorld, media_filename
from adapters.outbound.wecom_paths import (
    APIS,
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
from application.errors import WeComError
from domain.messages import CustomerRef
from tests.support.multipart import MultipartError, parse_form

BAD_GATEWAY_HTML = "<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One request the server answered."""

    api: str
    method: str
    access_token: str | None  # the query-string token (None: absent, and always for gettoken)
    body: dict[str, Any] | None
    errcode: int | None  # the errcode answered, None for injected HTTP/HTML failures


@dataclass(slots=True)
class _HttpFailure:
    delay_s: float = 0.0
    status: int | None = None  # None with html=False: only delay, then answer normally
    body: str = ""
    content_type: str = "text/html"


class FakeWeComServer:
    """The WeCom kf API over HTTP, programmable by tests. Thread-safe: uvicorn serves it from a thread.

    Tests seed and inspect the `KfWorld` behind it through `.world`; this class adds what only HTTP has:
    access tokens, recorded calls, HTTP-level failures."""

    def __init__(
        self,
        world: KfWorld | None = None,
        *,
        corp_id: str = "wwfakecorp0001",
        corp_secret: str = "fake-corp-secret-0001",
        expires_in: int = 7200,
        clock: Callable[[], float] | None = None,
        page_size: int | None = None,
    ) -> None:
        self.world = world if world is not None else KfWorld(clock=clock or time.time)
        if page_size is not None:
            self.world.page_size = page_size
        self.corp_id = corp_id
        self.corp_secret = corp_secret
        self.expires_in = expires_in
        self.calls: list[RecordedCall] = []
        self.issued_tokens: list[str] = []
        self._tokens: dict[str, float] = {}  # token → expires at (world clock)
        self._revoked: dict[str, int] = {}  # token → errcode it now answers
        self._http_failures: dict[str, list[_HttpFailure]] = {}
        self._lock = threading.Lock()
        self._held: set[str] = set()  # apis whose calls wait until release()
        self._waiting: dict[str, int] = {}  # api → calls waiting now
        # media/get answers errors as JSON instead of bytes; the exact Content-Type is NOT VERIFIED
        # (docs/wecom-kf.md, media/get), so tests may switch it to text/plain.
        self.media_error_content_type = "application/json; charset=UTF-8"
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            SYNC_MSG: self._sync_msg,
            SEND_MSG: self._send_msg,
            SEND_MSG_ON_EVENT: self._send_msg_on_event,
            SERVICE_STATE_GET: self._service_state_get,
            SERVICE_STATE_TRANS: self._service_state_trans,
            CUSTOMER_BATCHGET: self._customer_batchget,
        }
        routes = [
            Route(CGI_BIN + GETTOKEN, self._gettoken, methods=["GET"]),
            Route(CGI_BIN + MEDIA_GET, self._media_get, methods=["GET"]),
            Route(CGI_BIN + MEDIA_UPLOAD, self._media_upload, methods=["POST"]),
        ]
        routes += [
            Route(CGI_BIN + api, self._endpoint(api, handler), methods=["GET", "POST"])
            for api, handler in handlers.items()
        ]
        self._app = Starlette(routes=routes)

    @property
    def app(self) -> Starlette:
        return self._app

    def reset(self, world: KfWorld | None = None) -> None:
        """Start over with `world` (or a fresh one): calls, tokens and injected failures are forgotten, so one
        served instance can back many tests."""
        with self._lock:
            self.world = world if world is not None else KfWorld(clock=self.world.clock)
            self.calls.clear()
            self.issued_tokens.clear()
            self._tokens.clear()
            self._revoked.clear()
            self._http_failures.clear()

    # --- what happened ---------------------------------------------------------------------------------

    def calls_to(self, api: str) -> list[RecordedCall]:
        with self._lock:
            return [c for c in self.calls if c.api == api]

    @property
    def gettoken_calls(self) -> int:
        return len(self.calls_to(GETTOKEN))

    @property
    def sync_calls(self) -> int:
        return len(self.calls_to(SYNC_MSG))

    @property
    def sync_tokens(self) -> list[str | None]:
        """The callback `token` each sync_msg call carried (None when omitted)."""
        return [(c.body or {}).get("token") for c in self.calls_to(SYNC_MSG)]

    # --- knobs -----------------------------------------------------------------------------------------

    def fail_next_http(
        self,
        api: str,
        status: int = 502,
        *,
        times: int = 1,
        body: str = BAD_GATEWAY_HTML,
        content_type: str = "text/html",
    ) -> None:
        """The next `times` calls of `api` get HTTP `status` with `body` (by default a proxy's HTML error
        page)."""
        self._add_failure(api, times, _HttpFailure(status=status, body=body, content_type=content_type))

    def respond_html_next(self, api: str, *, times: int = 1) -> None:
        """The next `times` calls of `api` get HTTP 200 with an HTML body (a captive portal, a WAF page)."""
        self._add_failure(api, times, _HttpFailure(status=200, body="<html><body>blocked</body></html>"))

    def delay_next(self, api: str, seconds: float, *, times: int = 1) -> None:
        """The next `times` calls of `api` are answered normally after `seconds`."""
        self._add_failure(api, times, _HttpFailure(delay_s=seconds))

    def hold(self, api: str) -> None:
        """Calls of `api` wait (unanswered, connection open) until `release(api)`: a pull stuck at WeCom."""
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; one of {APIS}")
        with self._lock:
            self._held.add(api)

    def release(self, api: str) -> None:
        """The calls held by `hold(api)` go on, and later ones are answered at once."""
        with self._lock:
            self._held.discard(api)

    def waiting(self, api: str) -> int:
        """How many calls of `api` are held right now."""
        with self._lock:
            return self._waiting.get(api, 0)

    def revoke_tokens(self, errcode: int = 40014) -> None:
        """Every access token issued so far now answers `errcode` (40014 invalid, 42001 expired)."""
        with self._lock:
            for token in self._tokens:
                self._revoked[token] = errcode

    # --- gettoken --------------------------------------------------------------------------------------

    async def _gettoken(self, request: Request) -> Response:
        api = GETTOKEN
        early = await self._injected(api)
        if early is not None:
            self._record(api, request.method, None, None, None)
            return early
        corpid = request.query_params.get("corpid")
        secret = request.query_params.get("corpsecret")
        answer: dict[str, Any]
        try:
            self.world.check_failure(api)
            if not secret:
                raise WeComError(41004, "corpsecret missing", api=api)
            if corpid != self.corp_id:
                raise WeComError(40013, "invalid corpid", api=api)
            if secret != self.corp_secret:
                raise WeComError(40001, "invalid credential", api=api)
            token = "tok_" + secrets.token_urlsafe(32)
            with self._lock:
                self._tokens[token] = self.world.clock() + self.expires_in
                self.issued_tokens.append(token)
            answer = {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": self.expires_in}
        except WeComError as exc:
            answer = _error(exc)
        self._record(api, request.method, None, None, answer["errcode"])
        return JSONResponse(answer)

    # --- media ---------------------------------------------------------------------------------------------

    async def _media_get(self, request: Request) -> Response:
        """GET media/get: the bytes, typed and named, or an errcode JSON (docs/wecom-kf.md)."""
        api = MEDIA_GET
        token = request.query_params.get("access_token")
        early = await self._injected(api)
        if early is not None:
            self._record(api, request.method, token, None, None)
            return early
        media_id = request.query_params.get("media_id", "")
        try:
            self._check_token(api, token)
            stored = self.world.media_get(media_id)
        except WeComError as exc:
            self._record(api, request.method, token, {"media_id": media_id}, exc.errcode)
            return Response(
                json.dumps(_error(exc)), media_type=self.media_error_content_type, status_code=200
            )
        self._record(api, request.method, token, {"media_id": media_id}, 0)
        return Response(
            stored.data,
            media_type=stored.content_type,
            headers={
                "Content-Disposition": _disposition(media_filename(stored)),
                "Cache-Control": "no-cache, must-revalidate",
            },
        )

    async def _media_upload(self, request: Request) -> Response:
        """POST media/upload?type=…: one multipart part named `media` (docs/wecom-kf.md)."""
        api = MEDIA_UPLOAD
        token = request.query_params.get("access_token")
        early = await self._injected(api)
        if early is not None:
            self._record(api, request.method, token, None, None)
            return early
        kind = request.query_params.get("type", "")
        recorded: dict[str, Any] = {"type": kind}
        try:
            self._check_token(api, token)
            try:
                parts = parse_form(request.headers.get("content-type", ""), await request.body())
            except MultipartError as exc:
                raise WeComError(40058, f"invalid parameter: {exc}", api=api) from None
            media = next((p for p in parts if p.name == "media" and p.filename is not None), None)
            if media is None:
                raise WeComError(44001, "empty media data", api=api)
            recorded.update(filename=media.filename, content_type=media.content_type, size=len(media.data))
            media_id = self.world.media_upload(
                kind, media.filename or "", media.content_type or "", media.data
            )
            answer: dict[str, Any] = {
                "errcode": 0,
                "errmsg": "",
                "type": kind,
                "media_id": media_id,
                "created_at": str(int(self.world.clock())),  # a string, as WeCom sends it
            }
        except WeComError as exc:
            answer = _error(exc)
        self._record(api, request.method, token, recorded, answer["errcode"])
        return JSONResponse(answer)

    # --- kf endpoints ----------------------------------------------------------------------------------

    def _endpoint(
        self, api: str, handler: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            token = request.query_params.get("access_token")
            early = await self._injected(api)
            if early is not None:
                self._record(api, request.method, token, None, None)
                return early
            body: dict[str, Any] | None = None
            try:
                self._check_token(api, token)
                if request.method != "POST":
                    raise WeComError(40058, "invalid parameter: POST required", api=api)
                try:
                    body = json.loads(await request.body())
                except ValueError:
                    body = None
                if not isinstance(body, dict):
                    raise WeComError(40058, "invalid parameter: body is not a JSON object", api=api)
                answer = {"errcode": 0, "errmsg": "ok", **handler(body)}  # KfWorld applies fail_next
            except WeComError as exc:
                answer = _error(exc)
            self._record(api, request.method, token, body, answer["errcode"])
            if answer["errcode"] == 0 and self.world.take_lost_response(api):
                return _dropped_connection()
            return JSONResponse(answer)

        return endpoint

    def _sync_msg(self, body: dict[str, Any]) -> dict[str, Any]:
        limit = _int_field(SYNC_MSG, body, "limit", default=1000)
        result = self.world.sync(
            _str_field(SYNC_MSG, body, "open_kfid"),
            cursor=_str_field(SYNC_MSG, body, "cursor") or None,
            token=_str_field(SYNC_MSG, body, "token") or None,
            limit=limit,
        )
        return {"next_cursor": result.next_cursor, "has_more": int(result.has_more), "msg_list": result.items}

    def _send_msg(self, body: dict[str, Any]) -> dict[str, Any]:
        msgtype = _str_field(SEND_MSG, body, "msgtype")
        content = body.get(msgtype) if msgtype else None
        if not isinstance(content, dict):
            raise WeComError(40058, f"invalid parameter: {msgtype or 'msgtype'} body missing", api=SEND_MSG)
        msgid = self.world.send_msg(
            _str_field(SEND_MSG, body, "open_kfid"),
            _str_field(SEND_MSG, body, "touser"),
            msgtype,
            content,
            msgid=_str_field(SEND_MSG, body, "msgid"),
        )
        return {"msgid": msgid}

    def _send_msg_on_event(self, body: dict[str, Any]) -> dict[str, Any]:
        api = SEND_MSG_ON_EVENT
        msgtype = _str_field(api, body, "msgtype")
        content = body.get(msgtype) if msgtype else None
        if not isinstance(content, dict):
            raise WeComError(40058, f"invalid parameter: {msgtype or 'msgtype'} body missing", api=api)
        code = _str_field(api, body, "code")
        msgid = self.world.send_on_event(code, msgtype, content, msgid=_str_field(api, body, "msgid"))
        return {"msgid": msgid}

    def _service_state_get(self, body: dict[str, Any]) -> dict[str, Any]:
        api = SERVICE_STATE_GET
        customer = CustomerRef(_str_field(api, body, "open_kfid"), _str_field(api, body, "external_userid"))
        state = self.world.get_state(customer)
        answer: dict[str, Any] = {"service_state": state.state}
        if state.servicer_userid:
            answer["servicer_userid"] = state.servicer_userid
        return answer

    def _service_state_trans(self, body: dict[str, Any]) -> dict[str, Any]:
        api = SERVICE_STATE_TRANS
        customer = CustomerRef(_str_field(api, body, "open_kfid"), _str_field(api, body, "external_userid"))
        if "service_state" not in body:
            raise WeComError(40058, "invalid parameter: service_state required", api=api)
        state = _int_field(api, body, "service_state", default=-1)
        code = self.world.transfer(customer, state, _str_field(api, body, "servicer_userid"))
        return {"msg_code": code} if code else {}

    def _customer_batchget(self, body: dict[str, Any]) -> dict[str, Any]:
        with_context = _int_field(CUSTOMER_BATCHGET, body, "need_enter_session_context", default=0)
        return self.world.batchget(body.get("external_userid_list"), with_context=with_context == 1)

    # --- internals -------------------------------------------------------------------------------------

    def _check_token(self, api: str, token: str | None) -> None:
        if not token:
            raise WeComError(41001, "access_token missing", api=api)
        with self._lock:
            expires_at = self._tokens.get(token)
            revoked = self._revoked.get(token)
        if expires_at is None:
            raise WeComError(40014, "invalid access_token", api=api)
        if revoked is not None:
            raise WeComError(revoked, "access_token revoked", api=api)
        if self.world.clock() >= expires_at:
            raise WeComError(42001, "access_token expired", api=api)

    def _add_failure(self, api: str, times: int, failure: _HttpFailure) -> None:
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; one of {APIS}")
        with self._lock:
            self._http_failures.setdefault(api, []).extend([failure] * times)

    async def _injected(self, api: str) -> Response | None:
        await self._wait_while_held(api)
        with self._lock:
            queue = self._http_failures.get(api)
            failure = queue.pop(0) if queue else None
        if failure is None:
            return None
        if failure.delay_s:
            await anyio.sleep(failure.delay_s)
        if failure.status is None:
            return None
        return Response(failure.body, status_code=failure.status, media_type=failure.content_type)

    async def _wait_while_held(self, api: str) -> None:
        with self._lock:
            if api not in self._held:
                return
            self._waiting[api] = self._waiting.get(api, 0) + 1
        try:
            while True:
                with self._lock:
                    if api not in self._held:
                        return
                await anyio.sleep(0.01)  # the test releases from its own thread
        finally:
            with self._lock:
                self._waiting[api] -= 1

    def _record(
        self, api: str, method: str, token: str | None, body: dict[str, Any] | None, errcode: int | None
    ) -> None:
        with self._lock:
            self.calls.append(RecordedCall(api, method, token, body, errcode))


def _disposition(filename: str) -> str:
    """`attachment; filename="…"`, plus the RFC 5987 form when the name is not ASCII."""
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_")
    header = f'attachment; filename="{ascii_name}"'
    if not filename.isascii():
        header += f"; filename*=UTF-8''{quote(filename)}"
    return header


def _error(exc: WeComError) -> dict[str, Any]:
    return {"errcode": exc.errcode, "errmsg": exc.errmsg}


def _str_field(api: str, body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise WeComError(40058, f"invalid parameter: {name} must be a string", api=api)
    return value


def _int_field(api: str, body: dict[str, Any], name: str, *, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WeComError(40058, f"invalid parameter: {name} must be an integer", api=api)
    return value


class _AnswerLost(Exception):
    """Raised mid-body so that uvicorn closes the connection: the call took effect, its answer is lost."""


def _dropped_connection() -> Response:
    """A response that starts and then breaks off: the client sees the connection closed before the body
    it was promised (httpx: RemoteProtocolError), as when a timeout or a proxy cuts an answer."""

    async def body() -> AsyncIterator[bytes]:
        yield b'{"errcode":'
        raise _AnswerLost("answer lost on purpose (world.lose_response_next)")

    return StreamingResponse(body(), media_type="application/json", headers={"content-length": "64"})
