"""`/webhook`: WeCom's URL verification (GET) and callbacks (POST), acknowledged in milliseconds.

Hostile input (the URL is public, anyone can call it):

- Signature first: nothing starts (no pull, no `sync_msg`) unless `msg_signature` matches the Token and the
  envelope decrypts (AES key, padding, length field, receive id) to a `kf_msg_or_event` notice.
- Size: a body over `MAX_BODY_BYTES` (64 KiB) is refused with 413; a declared `Content-Length` over it is
  refused before a byte of the body is read, an undeclared (chunked) one as soon as it passes the limit.
- Time: the body must arrive within `body_timeout_s` (10 s; WeCom itself gives up after 5 s), else 408. A
  client that trickles bytes or never finishes its body holds a connection for that long, no longer.
- Every refusal answers `Connection: close`: a refused client's unread body is not drained, and a trickling
  client cannot keep the connection open after its answer.
- XML: defusedxml with DTDs forbidden, for the envelope and the decrypted notice alike: no entity expansion
  (billion laughs), no external entities or DTD fetches; malformed XML is a 400.
- Refusals are 4xx with a short fixed reason; the log line names the reason and the client address, never
  a parameter or body value.

Replay: there is deliberately no timestamp freshness window. A callback carries no message content, only
"new data waits at WeCom for this kf account": replaying a captured (validly signed) callback, however
often, at worst causes a pull. Pulls for one account are coalesced, read from the stored cursor, and every
message is answered at most once (claim + done mark), so a replay never causes a second answer. A window
would instead risk refusing genuine callbacks whenever WeCom's clock and ours disagree, delaying answers
until the next recovery pull.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Final, Protocol
from urllib.parse import unquote_plus

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response

from adapters.inbound.wecom_crypto import MAX_BODY_BYTES, CallbackRejected, WeComCrypto, parse_notice
from application import telemetry as t
from application.telemetry import correlation_id
from domain.messages import CallbackNotice

log = logging.getLogger("kfdify.webhook")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_REQUIRED_GET = ("msg_signature", "timestamp", "nonce", "echostr")
_REQUIRED_POST = ("msg_signature", "timestamp", "nonce")

# Seconds a client has to deliver the whole POST body. WeCom waits 5 s for our answer, so its bodies (a few
# hundred bytes) arrive in milliseconds; only a slow or hostile client needs longer.
BODY_TIMEOUT_S = 10.0


class BodyTooLarge(Exception):
    pass


class CallbackCounters(Protocol):
    """What the webhook records (application.telemetry.Telemetry, or that handed to another loop)."""

    def count(self, name: str, n: int = 1) -> None: ...

    def count_labelled(self, name: str, label: str, n: int = 1) -> None: ...

    def observe(self, name: str, seconds: float) -> None: ...


HandOff = Callable[..., None]  # `hand_off(fn, *args)`: run fn(*args) on the loop that owns the pipeline


class HandedOffCounters:
    """Counters recorded through `hand_off` on the pipeline's loop (Telemetry is single-loop by design)."""

    def __init__(self, counters: CallbackCounters, hand_off: HandOff) -> None:
        self._counters = counters
        self._hand_off = hand_off

    def count(self, name: str, n: int = 1) -> None:
        self._hand_off(self._counters.count, name, n)

    def count_labelled(self, name: str, label: str, n: int = 1) -> None:
        self._hand_off(self._counters.count_labelled, name, label, n)

    def observe(self, name: str, seconds: float) -> None:
        self._hand_off(self._counters.observe, name, seconds)


async def read_limited(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes; a longer body (declared or actual) is refused without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLarge
        except ValueError:
            raise BodyTooLarge from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class WeComWebhook:
    def __init__(
        self,
        *,
        crypto: WeComCrypto,
        on_notice: Callable[[CallbackNotice], None],
        telemetry: CallbackCounters,
        accepting: Callable[[], bool] = lambda: True,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        if body_timeout_s <= 0:
            raise ValueError("body_timeout_s must be positive")
        self._crypto = crypto
        self._on_notice = on_notice
        self._telemetry = telemetry
        self._accepting = accepting
        self._body_timeout_s = body_timeout_s
        # Correlation ids: a random prefix per process, then a counter (no syscall per callback).
        self._id_prefix = secrets.token_hex(2)
        self._callbacks = 0

    def handed_off(self, hand_off: HandOff) -> WeComWebhook:
        """This webhook for another thread's event loop (adapters/inbound/pipeline_loop.py): it acknowledges
        there, and its notices and counters reach the pipeline through `hand_off`, in the order made."""
        other = WeComWebhook(
            crypto=self._crypto,
            on_notice=partial(hand_off, self._on_notice),
            telemetry=HandedOffCounters(self._telemetry, hand_off),
            accepting=self._accepting,
            body_timeout_s=self._body_timeout_s,
        )
        other._id_prefix = self._id_prefix
        return other

    async def verify(self, request: Request) -> Response:
        params = request.query_params
        missing = [name for name in _REQUIRED_GET if not params.get(name)]
        if missing:
            return self._reject_request(request, 400, f"missing query parameters: {', '.join(missing)}")
        try:
            echo = self._crypto.verify_url(
                msg_signature=params["msg_signature"],
                timestamp=params["timestamp"],
                nonce=params["nonce"],
                echostr=params["echostr"],
            )
        except CallbackRejected as exc:
            return self._reject_request(request, _status_for(exc), exc.reason)
        log.info("webhook URL verified")
        # Exactly the decrypted text: no quotes, no BOM, no newline.
        return Response(echo.encode("utf-8"), media_type="text/plain; charset=utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /webhook as a bare ASGI app: every callback pays only for what it needs (a Starlette Request,
        its QueryParams and a Response object cost more than the crypto, bench/FINDINGS.md #5)."""
        started = time.monotonic()
        # Background work started below inherits this id, so its log lines name the callback.
        self._callbacks += 1
        correlation_id.set(f"cb-{self._id_prefix}{self._callbacks:x}")
        self._telemetry.count("callbacks")
        if not self._accepting():
            # Shutting down: WeCom retries within seconds and another instance (or we, restarted) answers.
            return await self._reject(scope, receive, send, 503, "shutting down")
        params = _query(scope["query_string"])
        missing = [name for name in _REQUIRED_POST if not params.get(name)]
        if missing:
            return await self._reject(
                scope, receive, send, 400, f"missing query parameters: {', '.join(missing)}"
            )
        try:
            async with asyncio.timeout(self._body_timeout_s):
                body = await _read_body(scope, receive, MAX_BODY_BYTES)
        except BodyTooLarge:
            return await self._reject(scope, receive, send, 413, f"body larger than {MAX_BODY_BYTES} bytes")
        except TimeoutError:
            return await self._reject(
                scope, receive, send, 408, f"body not received within {self._body_timeout_s:g} s"
            )
        except ClientDisconnect:
            return await self._reject(scope, receive, send, 400, "client went away mid-body")
        try:
            xml = self._crypto.decrypt_callback(
                msg_signature=params["msg_signature"],
                timestamp=params["timestamp"],
                nonce=params["nonce"],
                body=body,
            )
            notice = parse_notice(xml)
        except CallbackRejected as exc:
            return await self._reject(scope, receive, send, _status_for(exc), exc.reason)
        if notice.asks_for_pull:
            self._on_notice(notice)
        else:
            self._telemetry.count_labelled("callback_events", notice.event or "unknown")
        elapsed = time.monotonic() - started
        self._telemetry.observe(t.CALLBACK_ACK, elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "callback received event=%s kf=%s in %.1f ms",
                notice.event or "-",
                notice.open_kfid or "-",
                elapsed * 1000,
            )
        await send(_SUCCESS_START)
        await send(_SUCCESS_BODY)

    def _refusal(self, method: str, client: Any, status: int, reason: str) -> Response:
        self._telemetry.count_labelled("callbacks_rejected", str(status))
        host = client[0] if client else "-"
        log.warning("webhook %s rejected with %d from %s: %s", method, status, host, reason)
        # Close: the body may be unread (too large, too slow, never checked), and keeping the connection
        # would let the client go on trickling into it after its answer.
        return PlainTextResponse(reason, status_code=status, headers={"Connection": "close"})

    async def _reject(self, scope: Scope, receive: Receive, send: Send, status: int, reason: str) -> None:
        await self._refusal(scope["method"], scope.get("client"), status, reason)(scope, receive, send)

    def _reject_request(self, request: Request, status: int, reason: str) -> Response:
        return self._refusal(request.method, request.client, status, reason)


_SUCCESS_START: Final = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"7")],
}
_SUCCESS_BODY: Final = {"type": "http.response.body", "body": b"success"}


def _query(raw: bytes) -> dict[str, str]:
    """The query string as Starlette's QueryParams reads it (latin-1 bytes, %-escapes as UTF-8, '+' as a
    space, the last of repeated names wins), without building a multi-dict per callback."""
    params: dict[str, str] = {}
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name, value = unquote_plus(name), unquote_plus(value)
        params[name] = value
    return params


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Like `read_limited`, on the ASGI messages themselves."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit() or int(value) > limit:
                raise BodyTooLarge
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _status_for(exc: CallbackRejected) -> int:
    # -40001 signature mismatch: 403; a body over the limit: 413; anything malformed: 400.
    if exc.code == -40001:
        return 403
    if "too large" in exc.reason:
        return 413
    return 400
