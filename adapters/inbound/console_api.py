"""The operator console: its static files at /console and the admin endpoints it reads (/admin/...).

The console is a page and nothing more: every number and every action is an admin API call with
`Authorization: Bearer <ADMIN_TOKEN>`, guarded exactly as /status is (same token check and lockout,
adapters/inbound/admin_api.py). The data it shows over time comes from this instance's Insights
(application/insights.py); the try-it chat runs the real application core over an in-memory WeCom, as
`python bootstrap.py simulate` does (the caller passes the factory, so this module imports no outbound
adapter). No CORS headers: the page and the API share one origin.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from adapters.inbound.admin_api import AdminApi, _json_body
from application.admin import ConversationAdmin, StatusReport, profile_view
from application.insights import CustomerActivity, Insights
from domain.messages import CustomerRef
from domain.session import KnownSession, SessionState

log = logging.getLogger("kfdify.console")

# Strict: only this origin's files, no inline script or style, no framing, no form posts anywhere.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
API_HEADERS: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

# The console's files (adapters/inbound/console/): served from this list only, never from a path.
ASSETS: Final = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "i18n.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

MAX_TRY_TEXT: Final = 2000
MAX_TRY_SESSIONS: Final = 4
TRY_IDLE_S: Final = 15 * 60
TRY_TURN_TIMEOUT_S: Final = 120.0
_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
_ID: Final = re.compile(r"[A-Za-z0-9_@.:-]{1,128}")
MAX_LIST: Final = 200


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=API_HEADERS)


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": message}, status)


def load_assets() -> dict[str, bytes]:
    folder = resources.files("adapters.inbound") / "console"
    return {name: (folder / name).read_bytes() for name in ASSETS}


# --- try it -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bubble:
    """One message the bot sent, as WeChat shows it: a text, or a menu of tappable items."""

    kind: str  # "text" | "menu" | "media"
    text: str
    items: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text": self.text,
            "bytes": len(self.text.encode("utf-8")),
            "items": [{"id": item_id, "text": content} for item_id, content in self.items],
        }


class TryChat(Protocol):
    """The real application core over an in-memory WeCom and the route's real Dify engine
    (bootstrap.build_try_chat)."""

    app_label: str

    def push_text(self, text: str) -> None: ...

    def sent(self) -> list[Bubble]: ...

    def notify(self) -> None: ...

    async def idle(self) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


TryFactory = Callable[[str | None], TryChat]


@dataclass
class _TrySession:
    chat: TryChat
    open_kfid: str
    lock: asyncio.Lock
    used_at: float
    seen: int = 0


class TrySessions:
    """At most MAX_TRY_SESSIONS chats (one per browser tab), the least recently used one stopped first."""

    def __init__(self, factory: TryFactory, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = factory
        self._clock = clock
        self._sessions: OrderedDict[str, _TrySession] = OrderedDict()

    async def turn(self, session_id: str, open_kfid: str | None, text: str) -> tuple[list[Bubble], str]:
        session = await self._session(session_id, open_kfid or "")
        async with session.lock:
            session.used_at = self._clock()
            session.chat.push_text(text)
            session.chat.notify()
            async with asyncio.timeout(TRY_TURN_TIMEOUT_S):
                await session.chat.idle()
            sent = session.chat.sent()
            new, session.seen = sent[session.seen :], len(sent)
            return new, session.chat.app_label

    async def reset(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        await self._stop(session)
        return True

    async def aclose(self) -> None:
        while self._sessions:
            _, session = self._sessions.popitem()
            await self._stop(session)

    async def _session(self, session_id: str, open_kfid: str) -> _TrySession:
        session = self._sessions.get(session_id)
        if session is not None and session.open_kfid != open_kfid:  # another kf account: a fresh chat
            await self.reset(session_id)
            session = None
        if session is not None:
            self._sessions.move_to_end(session_id)
            return session
        now = self._clock()
        for stale_id in [sid for sid, s in self._sessions.items() if now - s.used_at > TRY_IDLE_S]:
            await self.reset(stale_id)
        while len(self._sessions) >= MAX_TRY_SESSIONS:
            _, oldest = self._sessions.popitem(last=False)
            await self._stop(oldest)
        chat = self._factory(open_kfid or None)
        await chat.start()
        session = _TrySession(chat, open_kfid, asyncio.Lock(), now)
        self._sessions[session_id] = session
        return session

    async def _stop(self, session: _TrySession) -> None:
        try:
            await session.chat.stop()
        except Exception:
            log.exception("stopping a try-it chat failed")


# --- the endpoints ------------------------------------------------------------------------------------


class KnownSessions(Protocol):
    def known(self, customer: CustomerRef) -> KnownSession | None: ...


_OWNERS: Final = {
    SessionState.NEW: "bot",
    SessionState.BOT: "bot",
    SessionState.QUEUED: "queue",
    SessionState.HUMAN: "human",
    SessionState.ENDED: "ended",
}


class ConsoleApi:
    def __init__(
        self,
        *,
        admin: AdminApi,
        status: StatusReport,
        insights: Insights,
        conversations: ConversationAdmin,
        sessions: KnownSessions,
        try_sessions: TrySessions,
        kf_accounts: Sequence[str] = (),
    ) -> None:
        self._admin = admin
        self._status = status
        self._insights = insights
        self._conversations = conversations
        self._sessions = sessions
        self._try = try_sessions
        self._kf_accounts = tuple(kf_accounts)
        self._assets = load_assets()

    def routes(self) -> list[Route]:
        guard = self._admin.guarded
        return [
            Route("/console", self.page, methods=["GET"]),
            Route("/console/", self.page, methods=["GET"]),
            Route("/console/{name}", self.asset, methods=["GET"]),
            Route("/admin/overview", guard(self.overview), methods=["GET"]),
            Route("/admin/customers", guard(self.customers), methods=["GET"]),
            Route("/admin/customers/{open_kfid}/{external_userid}", guard(self.customer), methods=["GET"]),
            Route("/admin/problems", guard(self.problems), methods=["GET"]),
            Route("/admin/try", guard(self.try_turn), methods=["POST"]),
            Route("/admin/try/reset", guard(self.try_reset), methods=["POST"]),
        ]

    # --- static -------------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        if request.url.path == "/console/":
            return RedirectResponse("/console", status_code=308, headers=PAGE_HEADERS)
        return Response(self._assets["index.html"], media_type=ASSETS["index.html"], headers=PAGE_HEADERS)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return _error(404, "not found")
        return Response(self._assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    # --- data ---------------------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        status = await self._status()
        store = status.get("store", {})
        self._insights.store_seen(degraded=bool(store.get("degraded")), backend=str(store.get("backend", "")))
        dependencies = status.get("dependencies", {})
        return _json(
            {
                "instance": self._insights.instance,
                "status": status.get("status"),
                "version": status.get("version"),
                "uptime_s": status.get("uptime_s"),
                "store": store,
                "wecom": dependencies.get("wecom"),
                "dify": dependencies.get("dify"),
                "windows": self._insights.windows(),
                "per_minute": self._insights.per_minute(),
                "in_flight": status.get("in_flight", 0),
                "dify_apps": status.get("dify_apps", {}),
                "kf_accounts": list(dict.fromkeys([*self._kf_accounts, *status.get("known_kfs", [])])),
            }
        )

    async def customers(self, request: Request) -> Response:
        query = request.query_params.get("q", "").strip()[:128]
        try:
            limit = min(max(int(request.query_params.get("limit", "50")), 1), MAX_LIST)
        except ValueError:
            return _error(400, "limit must be a number from 1 to 200")
        found = self._insights.customers(query, limit)
        rows = [await self._row(activity) for activity in found]
        return _json({"instance": self._insights.instance, "query": query, "customers": rows})

    async def customer(self, request: Request) -> Response:
        open_kfid = request.path_params["open_kfid"]
        user = request.path_params["external_userid"]
        if not _ID.fullmatch(open_kfid) or not _ID.fullmatch(user):
            return _error(400, "open_kfid and external_userid are WeCom ids")
        activity = self._insights.customer(open_kfid, user)
        found = await self._conversations.find(user, open_kfid)
        if activity is None and not found:
            return _error(404, "this instance has not seen this customer and no conversation is stored")
        detail: dict[str, Any] = {
            "instance": self._insights.instance,
            "open_kfid": open_kfid,
            "customer": user,
            "session_owner": self._owner(open_kfid, user),
            "conversation": found[0].conversation.to_dict() if found else None,
            # Who the customer is and where they came from (WeCom's batchget and enter_session), when known.
            "profile": profile_view(found[0].profile) if found and found[0].profile is not None else None,
        }
        if activity is not None:
            detail.update({k: v for k, v in activity.to_dict().items() if k not in ("open_kfid", "customer")})
        else:
            detail.update(
                {"nickname": "", "messages": 0, "last_outcome": "", "outcomes": [], "entered_at": None}
            )
        if not detail["nickname"] and detail["profile"] is not None:
            detail["nickname"] = detail["profile"]["nickname"]
        return _json(detail)

    async def problems(self, request: Request) -> Response:
        return _json(
            {
                "instance": self._insights.instance,
                "problems": [problem.to_dict() for problem in self._insights.problems()],
            }
        )

    async def try_turn(self, request: Request) -> Response:
        body, problem = await _json_body(request)
        if problem:
            return _error(400, problem)
        text, session_id, open_kfid = body.get("text"), body.get("session"), body.get("open_kfid")
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            return _error(400, "session must be 8 to 64 letters, digits, '-' or '_'")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TRY_TEXT:
            return _error(400, f"text is required, at most {MAX_TRY_TEXT} characters")
        if open_kfid is not None and (not isinstance(open_kfid, str) or not _ID.fullmatch(open_kfid)):
            return _error(400, "open_kfid must be a kf account id")
        try:
            bubbles, app = await self._try.turn(session_id, open_kfid, text.strip())
        except TimeoutError:
            return _error(504, "the bot did not finish in time")
        except Exception as exc:  # shown to the operator, who is trying things out
            log.exception("try-it turn failed")
            return _error(502, f"the simulation failed: {type(exc).__name__}")
        return _json({"session": session_id, "app": app, "bubbles": [b.to_dict() for b in bubbles]})

    async def try_reset(self, request: Request) -> Response:
        body, problem = await _json_body(request)
        if problem:
            return _error(400, problem)
        session_id = body.get("session")
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            return _error(400, "session must be 8 to 64 letters, digits, '-' or '_'")
        return _json({"session": session_id, "reset": await self._try.reset(session_id)})

    # --- helpers ------------------------------------------------------------------------------------------

    def _owner(self, open_kfid: str, user: str) -> str:
        known = self._sessions.known(CustomerRef(open_kfid, user))
        return _OWNERS.get(known.state, "unknown") if known is not None else "unknown"

    async def _row(self, activity: CustomerActivity) -> dict[str, Any]:
        found = await self._conversations.find(activity.customer, activity.open_kfid)
        profile = found[0].profile if found else None
        return {
            "open_kfid": activity.open_kfid,
            "customer": activity.customer,
            "nickname": activity.nickname or (profile.nickname if profile is not None else ""),
            "last_message_at": activity.last_message_at,
            "messages": activity.messages,
            "turns": found[0].conversation.turns if found else 0,
            "session_owner": self._owner(activity.open_kfid, activity.customer),
            "last_outcome": activity.last_outcome,
        }
