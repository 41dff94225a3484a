"""The original system's admin endpoints (JSON), behind a bearer token, plus health checks."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapters.inbound.auth_throttle import FailedAuthThrottle
from adapters.inbound.wecom_webhook import BodyTooLarge, read_limited
from application.admin import ConversationAdmin, StatusReport

log = logging.getLogger("kfdify.admin")

Endpoint = Callable[[Request], Awaitable[Response]]
MAX_ADMIN_BODY = 16 * 1024
ADMIN_BODY_TIMEOUT_S = 10.0


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _locked_out(seconds: int) -> JSONResponse:
    return JSONResponse(
        {"error": "too many failed admin attempts from this address: retry later"},
        status_code=429,
        headers={"Retry-After": str(seconds)},
    )


class AdminApi:
    def __init__(
        self,
        *,
        admin_token: str,
        conversations: ConversationAdmin,
        status: StatusReport,
        throttle: FailedAuthThrottle | None = None,
    ) -> None:
        self._token = admin_token.encode()
        self._conversations = conversations
        self._status = status
        self._throttle = throttle or FailedAuthThrottle()

    def guarded(self, endpoint: Endpoint) -> Endpoint:
        async def wrapper(request: Request) -> Response:
            if not self._token:
                return _error(403, "admin API disabled: set ADMIN_TOKEN in the configuration")
            address = request.client.host if request.client else "unknown"
            wait = self._throttle.retry_after(address)
            if wait:
                return _locked_out(wait)
            header = request.headers.get("authorization", "")
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
                lockout = self._throttle.failed(address)
                log.warning(
                    "admin request refused: bad or missing token (%s %s from %s)%s",
                    request.method,
                    request.url.path,
                    address,
                    f"; this address is locked out for {lockout} s" if lockout else "",
                )
                if lockout:
                    return _locked_out(lockout)
                return JSONResponse(
                    {"error": "unauthorized: send Authorization: Bearer <ADMIN_TOKEN>"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            self._throttle.succeeded(address)
            return await endpoint(request)

        return wrapper

    async def status(self, request: Request) -> Response:
        return JSONResponse(await self._status())

    async def clear(self, request: Request) -> Response:
        await self._conversations.clear()
        return JSONResponse({"cleared": True})

    async def get_conversation(self, request: Request) -> Response:
        user_id = request.query_params.get("user_id", "").strip()
        if not user_id:
            return _error(400, "user_id is required, e.g. /get_conversation?user_id=wmXXXX")
        open_kfid = request.query_params.get("open_kfid", "").strip() or None
        found = await self._conversations.find(user_id, open_kfid)
        if not found:
            return _error(404, "no conversation for this user", user_id=user_id)
        latest = found[0]
        return JSONResponse(
            {
                "user_id": user_id,
                **latest.to_dict(),
                "conversations": [f.to_dict() for f in found],
            }
        )

    async def reset_conversation(self, request: Request) -> Response:
        body, problem = await _json_body(request)
        if problem:
            return _error(400, problem)
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not user_id.strip():
            return _error(400, 'user_id is required: {"user_id": "wmXXXX"}')
        open_kfid = body.get("open_kfid")
        if open_kfid is not None and not isinstance(open_kfid, str):
            return _error(400, "open_kfid must be a string")
        count = await self._conversations.reset(user_id.strip(), (open_kfid or "").strip() or None)
        if count == 0:
            return _error(404, "no conversation for this user", user_id=user_id)
        return JSONResponse({"user_id": user_id, "reset": True, "conversations_reset": count})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        ready, detail = await self._status.ready()
        return JSONResponse({"ready": ready, **detail}, status_code=200 if ready else 503)


async def _json_body(request: Request) -> tuple[dict[str, Any], str]:
    try:
        async with asyncio.timeout(ADMIN_BODY_TIMEOUT_S):
            raw = await read_limited(request, MAX_ADMIN_BODY)
    except BodyTooLarge:
        return {}, "body too large"
    except TimeoutError:
        return {}, "body not received in time"
    if not raw.strip():
        return {}, "a JSON body is required"
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}, "body is not valid JSON"
    if not isinstance(body, dict):
        return {}, "body must be a JSON object"
    return body, ""
