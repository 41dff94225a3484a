"""An in-memory WeCom kf: one state machine (`KfWorld`) with two faces.

- `FakeKfChannel` drives it in-process and implements the `KfChannel` port for unit tests;
- `tests.support.wecom_server.FakeWeComServer` drives the same `KfWorld` behind the real HTTP API.

Both pass tests/contract/test_kf_channel.py. Rules follow specs/wecom-kf.md §5–7. Where WeCom's errcode is NOT
VERIFIED (spec §9.9) the fake picks one, named below: callers must only rely on "it is a WeComError".
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio.lowlevel

from adapters.outbound.wecom_messages import parse_sync_item, to_sync_item
from application.errors import MediaTooLarge, WeComError
from application.ports import ServiceState
from domain.media import (
    WECOM_UPLOAD_CAPS,
    WECOM_UPLOAD_IMAGE_TYPES,
    WECOM_UPLOAD_MIN_BYTES,
    MediaBlob,
    bare_type,
    extension_for_type,
    sniff_type,
)
from domain.messages import CustomerRef, InboundMessage, SyncPage

GETTOKEN = "gettoken"
SYNC_MSG = "kf/sync_msg"
SEND_MSG = "kf/send_msg"
SEND_MSG_ON_EVENT = "kf/send_msg_on_event"
SERVICE_STATE_GET = "kf/service_state/get"
SERVICE_STATE_TRANS = "kf/service_state/trans"
MEDIA_GET = "media/get"
MEDIA_UPLOAD = "media/upload"
APIS = (
    GETTOKEN,
    SYNC_MSG,
    SEND_MSG,
    SEND_MSG_ON_EVENT,
    SERVICE_STATE_GET,
    SERVICE_STATE_TRANS,
    MEDIA_GET,
    MEDIA_UPLOAD,
)

# errcodes (spec §6.4). Those marked "chosen" are the fake's pick where WeCom's is NOT VERIFIED.
ERR_INVALID_PARAM = 40058  # bad/missing field, text > 2048 bytes, bad msgid, bad cursor
ERR_DUPLICATE_MSGID = 40058  # chosen: a msgid reused within a kf account (spec §6.2, §9.9)
ERR_EMPTY_CONTENT = 44004
ERR_SEND_QUOTA = 95001
ERR_OUTSIDE_48H = 95002
ERR_BAD_CODE = 95007  # chosen: send_msg_on_event code unknown, used, expired or for a changed session
ERR_MENU_TOO_LONG = 95008
ERR_MENU_ITEM_TYPE = 95009
ERR_NOT_SERVICER = 95014
ERR_ILLEGAL_TRANSITION = 95016
ERR_SESSION_NOT_SENDABLE = 95018
ERR_SERVICER_STOPPED = 95019
# media (spec §7.3, §7.4)
ERR_BAD_MEDIA_TYPE = 40004
ERR_BAD_TYPE_PARAM = 40005
ERR_BAD_FILE_SIZE = 40006
ERR_INVALID_MEDIA_ID = 40007
ERR_IMAGE_SIZE = 40009
ERR_VIDEO_SIZE = 40011
ERR_EMPTY_MEDIA = 44001
MEDIA_TTL_S = 3 * 86400  # media_id lives 3 days
SEND_MEDIA_MSGTYPES = frozenset({"image", "voice", "video", "file"})

MAX_TEXT_BYTES = 2048
MAX_MENU_TEXT_BYTES = 1024
MAX_MENU_ITEMS = 10
MAX_MSGID_BYTES = 32
MAX_CURSOR_BYTES = 64
MAX_SYNC_TOKEN_BYTES = 128
MAX_SYNC_LIMIT = 1000
SEND_QUOTA = 5  # messages per customer message (spec §6.1)
SESSION_WINDOW_S = 48 * 3600
HISTORY_S = 3 * 86400  # sync_msg without cursor starts at the earliest message of the last 3 days
WELCOME_CODE_TTL_S = 20.0  # spec §7.1: welcome and closing codes
LONG_CODE_TTL_S = 48 * 3600.0  # queue and pick-up codes

# service_state moves allowed through `trans` (spec §7.2). 0 only comes from a customer message; nothing
# leaves 4 through the API.
ALLOWED_TRANSITIONS: dict[int, frozenset[int]] = {
    0: frozenset({1, 2, 3}),
    1: frozenset({2, 3}),
    2: frozenset({3}),
    3: frozenset({3, 4}),
    4: frozenset(),
}
SENDABLE_STATES = frozenset({0, 1})
SERVICER_RECEIVING = 1
SERVICER_STOPPED = 2

_MSGID_RE = re.compile(r"[0-9a-zA-Z_-]*")


class SentText(NamedTuple):
    """A text accepted by `kf/send_msg` (equal to a plain `(customer, text, msgid)` tuple)."""

    customer: CustomerRef
    text: str
    msgid: str


class SentOnEvent(NamedTuple):
    """A message accepted by `kf/send_msg_on_event`; `menu`: the (id, content) click items of a msgmenu."""

    code: str
    customer: CustomerRef
    text: str
    msgid: str
    menu: tuple[tuple[str, str], ...] = ()


class SentMedia(NamedTuple):
    """An image/voice/video/file message accepted by `kf/send_msg`."""

    customer: CustomerRef
    msgtype: str
    media_id: str
    msgid: str


@dataclass(frozen=True, slots=True)
class StoredMedia:
    """Temporary media: what a customer sent (seeded) or what `media/upload` received."""

    media_id: str
    kind: str  # image | voice | video | file
    data: bytes
    content_type: str
    filename: str
    created_at: float
    uploaded: bool  # through media/upload (only those can be sent, spec §6.4 40007 "wrong source API")


class SyncRequest(NamedTuple):
    open_kfid: str
    cursor: str | None
    token: str | None
    limit: int


@dataclass(frozen=True, slots=True)
class SyncResult:
    """One `sync_msg` page as WeCom JSON items."""

    items: list[dict[str, Any]]
    next_cursor: str
    has_more: bool


@dataclass(slots=True)
class _Session:
    state: int = 4  # "ended / not started" until the customer writes
    servicer_userid: str = ""
    quota: int = 0
    last_customer_time: float | None = None
    codes_issued: set[int] = field(default_factory=set)  # trans targets that already handed out a msg_code


@dataclass(slots=True)
class _Code:
    customer: CustomerRef
    expires_at: float
    msgtypes: frozenset[str]
    state: int | None  # the session state the code is bound to; None for welcome codes
    used: bool = False


class KfWorld:
    """WeCom kf state: per-kf message logs and cursors, sessions, servicers, event codes, sent messages.

    Synchronous and thread-safe (the HTTP face serves it from another thread). API methods raise `WeComError`;
    seeding methods are for tests. `clock` returns unix seconds.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.time, welcome_code_ttl_s: float = WELCOME_CODE_TTL_S
    ) -> None:
        self.clock = clock
        self.welcome_code_ttl_s = welcome_code_ttl_s
        # Largest page sync_msg returns, below the caller's limit (None: only the limit applies).
        self.page_size: int | None = None
        self.sent: list[SentText] = []
        self.sent_on_event: list[SentOnEvent] = []
        self.sent_media: list[SentMedia] = []
        self.media: dict[str, StoredMedia] = {}
        self.sync_requests: list[SyncRequest] = []
        self.servicers: dict[str, int] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._logs: dict[str, list[dict[str, Any]]] = {}
        self._cursors: dict[str, tuple[str, int]] = {}
        self._cursor_ids: dict[tuple[str, int], str] = {}
        self._empty_pages: dict[str, int] = {}
        self._sessions: dict[CustomerRef, _Session] = {}
        self._codes: dict[str, _Code] = {}
        self._outbound_msgids: dict[str, set[str]] = {}
        self._failures: dict[str, list[tuple[int, str]]] = {}

    # --- seeding (tests) -------------------------------------------------------------------------------

    def add_customer_text(
        self,
        open_kfid: str,
        external_userid: str,
        text: str,
        *,
        send_time: int | None = None,
        menu_id: str = "",
    ) -> str:
        """A customer text (origin 3); returns its msgid. Opens a session and renews the send quota."""
        body: dict[str, Any] = {"content": text}
        if menu_id:
            body["menu_id"] = menu_id
        return self.add_customer_message(open_kfid, external_userid, "text", body, send_time=send_time)

    def add_customer_message(
        self,
        open_kfid: str,
        external_userid: str,
        msgtype: str,
        body: Mapping[str, Any],
        *,
        send_time: int | None = None,
    ) -> str:
        """Any customer message, `body` being the object named after `msgtype` (spec §5.3)."""
        item = self._item(open_kfid, external_userid, 3, msgtype, dict(body), send_time)
        return self.add_item(item)

    def add_servicer_text(
        self,
        open_kfid: str,
        external_userid: str,
        servicer_userid: str,
        text: str,
        *,
        send_time: int | None = None,
    ) -> str:
        """A servicer text from the WeCom client (origin 5). An ended session becomes theirs (state 3)."""
        item = self._item(open_kfid, external_userid, 5, "text", {"content": text}, send_time)
        item["servicer_userid"] = servicer_userid
        return self.add_item(item)

    def add_event(
        self,
        open_kfid: str,
        event_type: str,
        *,
        external_userid: str = "",
        send_time: int | None = None,
        **fields: Any,
    ) -> str:
        """A system event (origin 4) with `fields` inside `event` (spec §5.4); returns its msgid.

        `welcome_code` / `msg_code` fields become usable codes; session_status_change moves the session.
        """
        event: dict[str, Any] = {"event_type": event_type, "open_kfid": open_kfid}
        if external_userid:
            event["external_userid"] = external_userid
        event.update(fields)
        with self._lock:
            item = {
                "msgid": self._next_id("msg"),
                "send_time": self._now_int() if send_time is None else send_time,
                "origin": 4,
                "msgtype": "event",
                "event": event,
            }
            return self.add_item(item)

    def add_enter_session(
        self,
        open_kfid: str,
        external_userid: str,
        *,
        scene: str = "",
        scene_param: str = "",
        welcome: bool = True,
        send_time: int | None = None,
    ) -> tuple[str, str]:
        """An enter_session event; returns (msgid, welcome_code or "")."""
        fields: dict[str, Any] = {}
        if scene:
            fields["scene"] = scene
        if scene_param:
            fields["scene_param"] = scene_param
        with self._lock:
            code = self._next_id("welcome") if welcome else ""
            if code:
                fields["welcome_code"] = code
            msgid = self.add_event(
                open_kfid, "enter_session", external_userid=external_userid, send_time=send_time, **fields
            )
        return msgid, code

    def add_media(self, data: bytes, content_type: str, *, filename: str = "", kind: str = "file") -> str:
        """Temporary media as a customer's message carries it (valid 3 days); returns its media_id."""
        with self._lock:
            media_id = self._next_id("MEDIA_") + "_" + "x" * 20
            self.media[media_id] = StoredMedia(
                media_id, kind, bytes(data), content_type, filename, self.clock(), uploaded=False
            )
            return media_id

    def add_customer_media(
        self,
        open_kfid: str,
        external_userid: str,
        msgtype: str,
        data: bytes,
        content_type: str,
        *,
        filename: str = "",
        send_time: int | None = None,
    ) -> tuple[str, str]:
        """A customer's image/voice/video/file message with its media; returns (msgid, media_id)."""
        media_id = self.add_media(data, content_type, filename=filename, kind=msgtype)
        msgid = self.add_customer_message(
            open_kfid, external_userid, msgtype, {"media_id": media_id}, send_time=send_time
        )
        return msgid, media_id

    def push(self, message: InboundMessage) -> None:
        """Add a domain message as WeCom would return it (see `to_sync_item`)."""
        self.add_item(to_sync_item(message))

    def add_item(self, item: Mapping[str, Any]) -> str:
        """Append a raw `msg_list` item as-is (odd inputs welcome), apply its effects; returns its msgid."""
        raw = copy.deepcopy(dict(item))
        with self._lock:
            message = parse_sync_item(raw)
            open_kfid = message.open_kfid if message else str(raw.get("open_kfid") or "")
            self._logs.setdefault(open_kfid, []).append(raw)
            if message is not None:
                self._apply(message)
            return message.msgid if message else ""

    def add_servicer(self, userid: str, *, status: int = SERVICER_RECEIVING) -> None:
        """A servicer the API may assign sessions to: status 1 receiving, 2 stopped/suspended."""
        with self._lock:
            self.servicers[userid] = status

    def set_service_state(self, customer: CustomerRef, state: int, servicer_userid: str = "") -> None:
        """Force a session state, bypassing the transfer rules."""
        with self._lock:
            session = self._session(customer)
            session.state = state
            session.servicer_userid = servicer_userid if state == 3 else ""
            if state in SENDABLE_STATES and session.last_customer_time is None:
                session.last_customer_time = self.clock()
                session.quota = SEND_QUOTA

    def inject_empty_pages(self, open_kfid: str, count: int = 1) -> None:
        """The next `count` syncs of `open_kfid` return no items but has_more=1 (WeCom may, spec §5.2)."""
        with self._lock:
            self._empty_pages[open_kfid] = self._empty_pages.get(open_kfid, 0) + count

    def fail_next(self, api: str, errcode: int, times: int = 1, errmsg: str = "injected failure") -> None:
        """The next `times` calls of `api` (one of `APIS`) answer `errcode` before doing anything."""
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; one of {APIS}")
        with self._lock:
            self._failures.setdefault(api, []).extend([(errcode, errmsg)] * times)

    def messages(self, open_kfid: str) -> list[dict[str, Any]]:
        """A copy of the kf account's message log (WeCom JSON items)."""
        with self._lock:
            return copy.deepcopy(self._logs.get(open_kfid, []))

    def code_is_usable(self, code: str) -> bool:
        with self._lock:
            return self._usable_code(code) is not None

    # --- the API ---------------------------------------------------------------------------------------

    def check_failure(self, api: str) -> None:
        """Raise the next injected failure of `api`, if any."""
        with self._lock:
            queue = self._failures.get(api)
            if queue:
                errcode, errmsg = queue.pop(0)
                raise WeComError(errcode, errmsg, api=api)

    def sync(self, open_kfid: str, *, cursor: str | None, token: str | None, limit: int) -> SyncResult:
        with self._lock:
            self.check_failure(SYNC_MSG)
            self.sync_requests.append(SyncRequest(open_kfid, cursor, token, limit))
            if not open_kfid:
                raise _invalid(SYNC_MSG, "open_kfid required")
            if cursor and len(cursor.encode()) > MAX_CURSOR_BYTES:
                raise _invalid(SYNC_MSG, "cursor too long")
            if token and len(token.encode()) > MAX_SYNC_TOKEN_BYTES:
                raise _invalid(SYNC_MSG, "token too long")
            log = self._logs.get(open_kfid, [])
            if cursor:
                # Cursor scope is NOT VERIFIED (spec §5.2): the fake binds a cursor to its kf account.
                kf_and_pos = self._cursors.get(cursor)
                if kf_and_pos is None or kf_and_pos[0] != open_kfid:
                    raise _invalid(SYNC_MSG, "invalid cursor")
                start = kf_and_pos[1]
            else:
                start = self._history_start(log)
            if self._empty_pages.get(open_kfid):
                self._empty_pages[open_kfid] -= 1
                return SyncResult([], self._cursor(open_kfid, start), True)
            size = limit if 0 < limit <= MAX_SYNC_LIMIT else MAX_SYNC_LIMIT
            if self.page_size is not None:
                size = min(size, max(1, self.page_size))
            items = copy.deepcopy(log[start : start + size])
            end = start + len(items)
            return SyncResult(items, self._cursor(open_kfid, end), end < len(log))

    def send_msg(
        self, open_kfid: str, touser: str, msgtype: str, body: Mapping[str, Any], *, msgid: str = ""
    ) -> str:
        """`kf/send_msg` (text only in the fake); returns the msgid."""
        with self._lock:
            self.check_failure(SEND_MSG)
            if not open_kfid or not touser:
                raise _invalid(SEND_MSG, "touser and open_kfid required")
            _check_msgid(SEND_MSG, msgid)
            if msgtype in SEND_MEDIA_MSGTYPES:
                media_id = body.get("media_id")
                stored = self.media.get(media_id) if isinstance(media_id, str) else None
                if stored is None or not stored.uploaded or stored.kind != msgtype or self._expired(stored):
                    raise WeComError(ERR_INVALID_MEDIA_ID, "invalid media_id", api=SEND_MSG)
                text = ""
            elif msgtype != "text":
                raise _invalid(SEND_MSG, f"msgtype {msgtype!r} not supported by the fake")
            else:
                text = _check_text(SEND_MSG, body.get("content"), MAX_TEXT_BYTES)
            self._check_unique(SEND_MSG, open_kfid, msgid)
            customer = CustomerRef(open_kfid, touser)
            session = self._session(customer)
            if session.state not in SENDABLE_STATES:
                raise WeComError(ERR_SESSION_NOT_SENDABLE, "send msg session status invalid", api=SEND_MSG)
            last = session.last_customer_time
            if last is None or self.clock() - last > SESSION_WINDOW_S:
                raise WeComError(ERR_OUTSIDE_48H, "send msg time limit", api=SEND_MSG)
            if session.quota <= 0:
                raise WeComError(ERR_SEND_QUOTA, "send msg count limit", api=SEND_MSG)
            session.quota -= 1
            session.state = 1  # sending via the API hands the session to the bot (spec §6.1)
            msgid = self._claim_msgid(open_kfid, msgid)
            if msgtype == "text":
                self.sent.append(SentText(customer, text, msgid))
            else:
                self.sent_media.append(SentMedia(customer, msgtype, str(body["media_id"]), msgid))
            return msgid

    def media_get(self, media_id: str) -> StoredMedia:
        """`media/get`: unknown, malformed or expired media is 40007 (spec §7.3)."""
        with self._lock:
            self.check_failure(MEDIA_GET)
            stored = self.media.get(media_id)
            if stored is None or self._expired(stored):
                raise WeComError(ERR_INVALID_MEDIA_ID, "invalid media_id", api=MEDIA_GET)
            return stored

    def media_upload(self, kind: str, filename: str, content_type: str, data: bytes) -> str:
        """`media/upload` with the checks of spec §7.4; returns the media_id."""
        api = MEDIA_UPLOAD
        with self._lock:
            self.check_failure(api)
            if kind not in WECOM_UPLOAD_CAPS:
                raise WeComError(ERR_BAD_TYPE_PARAM, "invalid media type param", api=api)
            if not data:
                raise WeComError(ERR_EMPTY_MEDIA, "empty media data", api=api)
            if not filename:
                raise _invalid(api, "media part without filename")
            if len(data) < WECOM_UPLOAD_MIN_BYTES:
                raise WeComError(ERR_BAD_FILE_SIZE, "invalid file size", api=api)
            over = len(data) > WECOM_UPLOAD_CAPS[kind]
            sniffed = sniff_type(data)
            if kind == "image":
                if over:
                    raise WeComError(ERR_IMAGE_SIZE, "invalid image size", api=api)
                # JPG/PNG only, judged by the bytes; the part's declared type must say so too (chosen: WeCom's
                # handling of a missing or contradicting part type is NOT VERIFIED).
                if sniffed not in WECOM_UPLOAD_IMAGE_TYPES or bare_type(content_type) != sniffed:
                    raise WeComError(ERR_BAD_MEDIA_TYPE, "invalid media type", api=api)
            elif kind == "voice":
                if over:
                    raise WeComError(ERR_BAD_FILE_SIZE, "invalid voice size", api=api)
                if sniffed != "audio/amr":
                    raise WeComError(ERR_BAD_MEDIA_TYPE, "invalid media type", api=api)
            elif kind == "video":
                if over:
                    raise WeComError(ERR_VIDEO_SIZE, "invalid video size", api=api)
                if data[4:8] != b"ftyp":
                    raise WeComError(ERR_BAD_MEDIA_TYPE, "invalid media type", api=api)
            elif over:
                raise WeComError(ERR_BAD_FILE_SIZE, "invalid file size", api=api)
            media_id = self._next_id("UPLOADED_") + "_" + "y" * 20
            self.media[media_id] = StoredMedia(
                media_id, kind, bytes(data), content_type or sniffed, filename, self.clock(), uploaded=True
            )
            return media_id

    def _expired(self, stored: StoredMedia) -> bool:
        return self.clock() - stored.created_at > MEDIA_TTL_S

    def send_on_event(self, code: str, msgtype: str, body: Mapping[str, Any], *, msgid: str = "") -> str:
        """`kf/send_msg_on_event`: text or msgmenu, once per code (spec §7.1); returns the msgid."""
        with self._lock:
            self.check_failure(SEND_MSG_ON_EVENT)
            _check_msgid(SEND_MSG_ON_EVENT, msgid)
            entry = self._usable_code(code)
            if entry is None:
                raise WeComError(ERR_BAD_CODE, "invalid msg code", api=SEND_MSG_ON_EVENT)
            if msgtype not in entry.msgtypes:
                raise _invalid(SEND_MSG_ON_EVENT, f"msgtype {msgtype!r} not allowed for this code")
            menu: tuple[tuple[str, str], ...] = ()
            if msgtype == "text":
                text = _check_text(SEND_MSG_ON_EVENT, body.get("content"), MAX_TEXT_BYTES)
            else:
                text, menu = _check_menu(body)
            open_kfid = entry.customer.open_kfid
            self._check_unique(SEND_MSG_ON_EVENT, open_kfid, msgid)
            entry.used = True
            msgid = self._claim_msgid(open_kfid, msgid)
            self.sent_on_event.append(SentOnEvent(code, entry.customer, text, msgid, menu))
            return msgid

    def get_state(self, customer: CustomerRef) -> ServiceState:
        with self._lock:
            self.check_failure(SERVICE_STATE_GET)
            if not customer.open_kfid or not customer.external_userid:
                raise _invalid(SERVICE_STATE_GET, "open_kfid and external_userid required")
            session = self._session(customer)
            return ServiceState(session.state, session.servicer_userid if session.state == 3 else "")

    def transfer(self, customer: CustomerRef, state: int, servicer_userid: str = "") -> str:
        """`service_state/trans`; returns the msg_code ("" when none is due)."""
        with self._lock:
            self.check_failure(SERVICE_STATE_TRANS)
            if not customer.open_kfid or not customer.external_userid:
                raise _invalid(SERVICE_STATE_TRANS, "open_kfid and external_userid required")
            if state not in ALLOWED_TRANSITIONS:
                raise _invalid(SERVICE_STATE_TRANS, "invalid service_state")
            session = self._session(customer)
            same_servicer = session.state == 3 and state == 3 and session.servicer_userid == servicer_userid
            if state not in ALLOWED_TRANSITIONS[session.state] or same_servicer:
                raise WeComError(
                    ERR_ILLEGAL_TRANSITION, "service state transition not allowed", api=SERVICE_STATE_TRANS
                )
            if state == 3:
                status = self.servicers.get(servicer_userid) if servicer_userid else None
                if status is None:
                    raise WeComError(ERR_NOT_SERVICER, "user is not a servicer", api=SERVICE_STATE_TRANS)
                if status != SERVICER_RECEIVING:
                    raise WeComError(
                        ERR_SERVICER_STOPPED, "servicer stopped receiving", api=SERVICE_STATE_TRANS
                    )
            code = ""
            # msg_code: when the session first moves to 2 or 3 (48 h, text) or to 4 (20 s, text/msgmenu).
            if state in (2, 3, 4) and state not in session.codes_issued:
                session.codes_issued.add(state)
                if state == 4:
                    code = self._issue_code(customer, self.welcome_code_ttl_s, {"text", "msgmenu"}, state)
                else:
                    code = self._issue_code(customer, LONG_CODE_TTL_S, {"text"}, state)
            session.state = state
            session.servicer_userid = servicer_userid if state == 3 else ""
            return code

    # --- internals -------------------------------------------------------------------------------------

    def _apply(self, message: InboundMessage) -> None:
        customer = message.customer
        if message.is_event and message.event is not None:
            self._apply_event(message)
        elif message.origin == 3 and customer.external_userid:
            session = self._session(customer)
            if session.state == 4:
                session.state = 0  # a new session (spec §7.2)
                session.servicer_userid = ""
                session.codes_issued.clear()
            session.quota = SEND_QUOTA
            session.last_customer_time = float(message.send_time)
        elif message.origin == 5 and customer.external_userid:
            session = self._session(customer)
            if session.state == 4:
                session.state = 3
                session.servicer_userid = message.extra.get("servicer_userid", "")

    def _apply_event(self, message: InboundMessage) -> None:
        event = message.event
        assert event is not None
        customer = CustomerRef(message.open_kfid, message.external_userid)
        if event.welcome_code and event.welcome_code not in self._codes:
            self._codes[event.welcome_code] = _Code(
                customer, self.clock() + self.welcome_code_ttl_s, frozenset({"text", "msgmenu"}), None
            )
        if event.event_type != "session_status_change" or not customer.external_userid:
            return
        session = self._session(customer)
        if event.change_type in (1, 2, 4):
            session.state = 3
            session.servicer_userid = event.new_servicer_userid
        elif event.change_type == 3:
            session.state = 4
            session.servicer_userid = ""
        if event.msg_code and event.msg_code not in self._codes:
            if event.change_type == 3:
                ttl, msgtypes = self.welcome_code_ttl_s, frozenset({"text", "msgmenu"})
            else:
                ttl, msgtypes = LONG_CODE_TTL_S, frozenset({"text"})
            self._codes[event.msg_code] = _Code(customer, self.clock() + ttl, msgtypes, session.state)

    def _session(self, customer: CustomerRef) -> _Session:
        return self._sessions.setdefault(customer, _Session())

    def _issue_code(self, customer: CustomerRef, ttl: float, msgtypes: set[str], state: int | None) -> str:
        code = self._next_id("code")
        self._codes[code] = _Code(customer, self.clock() + ttl, frozenset(msgtypes), state)
        return code

    def _usable_code(self, code: str) -> _Code | None:
        entry = self._codes.get(code)
        if entry is None or entry.used or self.clock() > entry.expires_at:
            return None
        # Except for welcome codes, a code only works while the session keeps the state it was issued in.
        if entry.state is not None and self._session(entry.customer).state != entry.state:
            return None
        return entry

    def _check_unique(self, api: str, open_kfid: str, msgid: str) -> None:
        if msgid and msgid in self._outbound_msgids.get(open_kfid, ()):
            raise WeComError(ERR_DUPLICATE_MSGID, "duplicate msgid", api=api)

    def _claim_msgid(self, open_kfid: str, msgid: str) -> str:
        msgid = msgid or self._next_id("sent")
        self._outbound_msgids.setdefault(open_kfid, set()).add(msgid)
        return msgid

    def _cursor(self, open_kfid: str, position: int) -> str:
        key = (open_kfid, position)
        cursor = self._cursor_ids.get(key)
        if cursor is None:
            cursor = self._next_id("cur")
            self._cursor_ids[key] = cursor
            self._cursors[cursor] = key
        return cursor

    def _history_start(self, log: list[dict[str, Any]]) -> int:
        oldest = self.clock() - HISTORY_S
        for index, item in enumerate(log):
            message = parse_sync_item(item)
            if message is None or not message.send_time or message.send_time >= oldest:
                return index
        return len(log)

    def _item(
        self,
        open_kfid: str,
        external_userid: str,
        origin: int,
        msgtype: str,
        body: dict[str, Any],
        send_time: int | None,
    ) -> dict[str, Any]:
        with self._lock:
            return {
                "msgid": self._next_id("msg"),
                "open_kfid": open_kfid,
                "external_userid": external_userid,
                "send_time": self._now_int() if send_time is None else send_time,
                "origin": origin,
                "msgtype": msgtype,
                msgtype: body,
            }

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}{self._counter}"

    def _now_int(self) -> int:
        return int(self.clock())


class KfWorldSeeding:
    """Test-side shortcuts to the `KfWorld` behind FakeKfChannel and FakeWeComServer: seed, inspect, fail."""

    world: KfWorld

    @property
    def sent(self) -> list[SentText]:
        return self.world.sent

    @property
    def sent_on_event(self) -> list[SentOnEvent]:
        return self.world.sent_on_event

    @property
    def sync_requests(self) -> list[SyncRequest]:
        return self.world.sync_requests

    @property
    def sent_media(self) -> list[SentMedia]:
        return self.world.sent_media

    def add_customer_media(
        self,
        open_kfid: str,
        external_userid: str,
        msgtype: str,
        data: bytes,
        content_type: str,
        *,
        filename: str = "",
        send_time: int | None = None,
    ) -> tuple[str, str]:
        return self.world.add_customer_media(
            open_kfid, external_userid, msgtype, data, content_type, filename=filename, send_time=send_time
        )

    def uploaded_media(self, media_id: str) -> StoredMedia:
        return self.world.media[media_id]

    def push(self, message: InboundMessage) -> None:
        self.world.push(message)

    def add_item(self, item: Mapping[str, Any]) -> str:
        return self.world.add_item(item)

    def add_customer_text(
        self,
        open_kfid: str,
        external_userid: str,
        text: str,
        *,
        send_time: int | None = None,
        menu_id: str = "",
    ) -> str:
        return self.world.add_customer_text(
            open_kfid, external_userid, text, send_time=send_time, menu_id=menu_id
        )

    def add_customer_message(
        self,
        open_kfid: str,
        external_userid: str,
        msgtype: str,
        body: Mapping[str, Any],
        *,
        send_time: int | None = None,
    ) -> str:
        return self.world.add_customer_message(open_kfid, external_userid, msgtype, body, send_time=send_time)

    def add_servicer_text(
        self,
        open_kfid: str,
        external_userid: str,
        servicer_userid: str,
        text: str,
        *,
        send_time: int | None = None,
    ) -> str:
        return self.world.add_servicer_text(
            open_kfid, external_userid, servicer_userid, text, send_time=send_time
        )

    def add_event(
        self,
        open_kfid: str,
        event_type: str,
        *,
        external_userid: str = "",
        send_time: int | None = None,
        **fields: Any,
    ) -> str:
        return self.world.add_event(
            open_kfid, event_type, external_userid=external_userid, send_time=send_time, **fields
        )

    def add_enter_session(
        self,
        open_kfid: str,
        external_userid: str,
        *,
        scene: str = "",
        scene_param: str = "",
        welcome: bool = True,
        send_time: int | None = None,
    ) -> tuple[str, str]:
        return self.world.add_enter_session(
            open_kfid,
            external_userid,
            scene=scene,
            scene_param=scene_param,
            welcome=welcome,
            send_time=send_time,
        )

    def add_servicer(self, userid: str, *, status: int = SERVICER_RECEIVING) -> None:
        self.world.add_servicer(userid, status=status)

    def set_service_state(self, customer: CustomerRef, state: int, servicer_userid: str = "") -> None:
        self.world.set_service_state(customer, state, servicer_userid)

    def inject_empty_pages(self, open_kfid: str, count: int = 1) -> None:
        self.world.inject_empty_pages(open_kfid, count)

    def fail_next(self, api: str, errcode: int, times: int = 1, errmsg: str = "injected failure") -> None:
        self.world.fail_next(api, errcode, times, errmsg)


class FakeKfChannel(KfWorldSeeding):
    """The `KfChannel` port in memory, over a `KfWorld` (shared with tests that seed it)."""

    def __init__(self, world: KfWorld | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.world = world if world is not None else KfWorld(clock=clock)

    # --- KfChannel -------------------------------------------------------------------------------------

    async def sync_messages(
        self, open_kfid: str, *, cursor: str | None, token: str | None, limit: int = 1000
    ) -> SyncPage:
        await anyio.lowlevel.checkpoint()
        result = self.world.sync(open_kfid, cursor=cursor, token=token, limit=limit)
        parsed = (parse_sync_item(item) for item in result.items)
        return SyncPage(tuple(m for m in parsed if m is not None), result.next_cursor, result.has_more)

    async def send_text(self, customer: CustomerRef, text: str, *, msgid: str) -> str:
        await anyio.lowlevel.checkpoint()
        return self.world.send_msg(
            customer.open_kfid, customer.external_userid, "text", {"content": text}, msgid=msgid
        )

    async def get_service_state(self, customer: CustomerRef) -> ServiceState:
        await anyio.lowlevel.checkpoint()
        return self.world.get_state(customer)

    async def transfer_service_state(
        self, customer: CustomerRef, *, state: int, servicer_userid: str = ""
    ) -> str:
        await anyio.lowlevel.checkpoint()
        return self.world.transfer(customer, state, servicer_userid)

    async def send_on_event(
        self, code: str, text: str, *, msgid: str, menu: Sequence[tuple[str, str]] = ()
    ) -> str:
        await anyio.lowlevel.checkpoint()
        if menu:
            body = {
                "head_content": text,
                "list": [{"type": "click", "click": {"id": i, "content": c}} for i, c in menu],
            }
            return self.world.send_on_event(code, "msgmenu", body, msgid=msgid)
        return self.world.send_on_event(code, "text", {"content": text}, msgid=msgid)

    async def check_access(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.world.check_failure(GETTOKEN)

    async def download_media(self, media_id: str, *, max_bytes: int) -> MediaBlob:
        await anyio.lowlevel.checkpoint()
        stored = self.world.media_get(media_id)
        if len(stored.data) > max_bytes:
            raise MediaTooLarge(max_bytes, len(stored.data))
        return MediaBlob(stored.data, stored.content_type, media_filename(stored))

    async def upload_media(self, kind: str, filename: str, content_type: str, data: bytes) -> str:
        await anyio.lowlevel.checkpoint()
        return self.world.media_upload(kind, filename, content_type, data)

    async def send_image(self, customer: CustomerRef, media_id: str, *, msgid: str) -> str:
        await anyio.lowlevel.checkpoint()
        return self.world.send_msg(
            customer.open_kfid, customer.external_userid, "image", {"media_id": media_id}, msgid=msgid
        )


def media_filename(stored: StoredMedia) -> str:
    """The name media/get gives in Content-Disposition: the sender's file name, else MEDIA_ID.ext."""
    if stored.filename:
        return stored.filename
    extension = extension_for_type(bare_type(stored.content_type))
    return f"{stored.media_id}.{extension}" if extension else stored.media_id


def _invalid(api: str, errmsg: str) -> WeComError:
    return WeComError(ERR_INVALID_PARAM, f"invalid parameter: {errmsg}", api=api)


def _check_msgid(api: str, msgid: object) -> None:
    if not isinstance(msgid, str) or len(msgid.encode()) > MAX_MSGID_BYTES or not _MSGID_RE.fullmatch(msgid):
        raise _invalid(api, "msgid must be at most 32 bytes of [0-9a-zA-Z_-]")


def _check_text(api: str, content: object, max_bytes: int) -> str:
    if content is None or content == "":
        raise WeComError(ERR_EMPTY_CONTENT, "empty content", api=api)
    if not isinstance(content, str):
        raise _invalid(api, "content must be a string")
    if len(content.encode()) > max_bytes:
        raise _invalid(api, f"content longer than {max_bytes} bytes")
    return content


def _check_menu(body: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    api = SEND_MSG_ON_EVENT
    head = body.get("head_content", "")
    tail = body.get("tail_content", "")
    for part in (head, tail):
        if not isinstance(part, str) or len(part.encode()) > MAX_MENU_TEXT_BYTES:
            raise _invalid(api, "head_content/tail_content must be strings of at most 1024 bytes")
    items = body.get("list", [])
    if not isinstance(items, list):
        raise _invalid(api, "list must be an array")
    if len(items) > MAX_MENU_ITEMS:
        raise WeComError(ERR_MENU_TOO_LONG, "too many menu items", api=api)
    menu: list[tuple[str, str]] = []
    for entry in items:
        kind = entry.get("type") if isinstance(entry, Mapping) else None
        if kind not in ("click", "view", "miniprogram", "text"):
            raise WeComError(ERR_MENU_ITEM_TYPE, "invalid menu item type", api=api)
        sub = entry.get(kind)
        content = sub.get("content") if isinstance(sub, Mapping) else None
        if not isinstance(content, str) or not content:
            raise _invalid(api, "menu item content required")
        if kind == "click":
            item_id = sub.get("id", "")
            if not isinstance(item_id, str) or len(item_id.encode()) > 128 or len(content.encode()) > 128:
                raise _invalid(api, "click id/content at most 128 bytes")
            menu.append((item_id, content))
    if not head and not menu:
        raise WeComError(ERR_EMPTY_CONTENT, "empty menu", api=api)
    return head, tuple(menu)
