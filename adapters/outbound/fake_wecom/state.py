"""The fake WeCom kf's state and how tests seed it: message logs, sessions, event codes, media, servicers.

`KfState` holds everything and applies what a message does (a customer message opens a session, a
session_status_change event moves it, ...); `KfWorld` (world.py) adds the API calls on top.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from adapters.outbound.fake_wecom.records import (
    EventCode,
    SentMedia,
    SentMenu,
    SentOnEvent,
    SentText,
    Session,
    StoredMedia,
    SyncRequest,
)
from adapters.outbound.fake_wecom.rules import (
    ERR_DUPLICATE_MSGID,
    HISTORY_S,
    LONG_CODE_TTL_S,
    SEND_QUOTA,
    SENDABLE_STATES,
    SERVICER_RECEIVING,
    WELCOME_CODE_TTL_S,
)
from adapters.outbound.wecom_messages import parse_sync_item, to_sync_item
from adapters.outbound.wecom_paths import APIS, SEND_MSG, SEND_MSG_ON_EVENT
from application.errors import WeComError
from domain.messages import CustomerRef, InboundMessage


class KfState:
    """WeCom kf state: per-kf message logs and cursors, sessions, servicers, event codes, media, sent items.

    Synchronous and thread-safe (the HTTP emulator serves it from another thread). The public methods here
    are for tests: seed, inspect, inject failures. `clock` returns unix seconds.
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
        # Every text (send_msg and send_msg_on_event alike) in the order WeCom accepted them.
        self._texts_sent: list[tuple[CustomerRef, str]] = []
        self.sent_media: list[SentMedia] = []
        self.sent_menus: list[SentMenu] = []
        self.media: dict[str, StoredMedia] = {}
        self.sync_requests: list[SyncRequest] = []
        self.servicers: dict[str, int] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._logs: dict[str, list[dict[str, Any]]] = {}
        self._cursors: dict[str, tuple[str, int]] = {}
        self._cursor_ids: dict[tuple[str, int], str] = {}
        self._empty_pages: dict[str, int] = {}
        self._sessions: dict[CustomerRef, Session] = {}
        self._codes: dict[str, EventCode] = {}
        self._outbound_msgids: dict[str, set[str]] = {}
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self._lost_responses: dict[str, int] = {}
        # kf/customer/batchget: profiles by external_userid (seeded), and each customer's newest entry
        # context (from enter_session events) with its time. `unionid_bound`: the corp has bound a WeChat
        # open platform account (else batchget gives no unionid).
        self.customer_profiles: dict[str, dict[str, Any]] = {}
        self.entry_contexts: dict[str, tuple[float, dict[str, Any]]] = {}
        self.unionid_bound = True
        # APIs this app has no permission for: they answer 48002 (e.g. batchget without customer-info rights).
        self.forbidden_apis: set[str] = set()

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
        """Any customer message, `body` being the object named after `msgtype` (docs/wecom-kf.md)."""
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
        """A system event (origin 4) with `fields` inside `event` (docs/wecom-kf.md); returns its msgid.

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
        wechat_channels: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """An enter_session event; returns (msgid, welcome_code or ""). `scene_param` goes out as given
        (WeCom hands it over URL-encoded)."""
        fields: dict[str, Any] = {}
        if scene:
            fields["scene"] = scene
        if scene_param:
            fields["scene_param"] = scene_param
        if wechat_channels:
            fields["wechat_channels"] = dict(wechat_channels)
        with self._lock:
            code = self._next_id("welcome") if welcome else ""
            if code:
                fields["welcome_code"] = code
            msgid = self.add_event(
                open_kfid, "enter_session", external_userid=external_userid, send_time=send_time, **fields
            )
        return msgid, code

    def add_customer_profile(
        self,
        external_userid: str,
        *,
        nickname: str = "",
        gender: int = 0,
        unionid: str = "",
        avatar: str = "",
    ) -> None:
        """What kf/customer/batchget tells about a customer (docs/wecom-kf.md §11)."""
        with self._lock:
            self.customer_profiles[external_userid] = {
                "external_userid": external_userid,
                "nickname": nickname,
                "avatar": avatar,
                "gender": gender,
                "unionid": unionid,
            }

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
        """The next `count` syncs of `open_kfid` return no items but has_more=1 (WeCom may: docs/wecom-kf.md,
        sync_msg)."""
        with self._lock:
            self._empty_pages[open_kfid] = self._empty_pages.get(open_kfid, 0) + count

    def fail_next(self, api: str, errcode: int, times: int = 1, errmsg: str = "injected failure") -> None:
        """The next `times` calls of `api` (one of `APIS`) answer `errcode` before doing anything."""
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; one of {APIS}")
        with self._lock:
            self._failures.setdefault(api, []).extend([(errcode, errmsg)] * times)

    def lose_response_next(self, api: str, times: int = 1) -> None:
        """The next `times` successful calls of `api` (send_msg or send_msg_on_event) take effect (the text is
        delivered, the msgid used) but their answer is lost on the way back: the caller sees a transport
        failure (`FakeKfChannel`) or a dropped connection (the HTTP emulator), as after a timeout."""
        if api not in (SEND_MSG, SEND_MSG_ON_EVENT):
            raise ValueError(
                f"lost responses are simulated for {SEND_MSG} and {SEND_MSG_ON_EVENT}, not {api!r}"
            )
        with self._lock:
            self._lost_responses[api] = self._lost_responses.get(api, 0) + times

    def take_lost_response(self, api: str) -> bool:
        """For the faces, after a call of `api` succeeded: True when its answer must be lost."""
        with self._lock:
            left = self._lost_responses.get(api, 0)
            if left <= 0:
                return False
            self._lost_responses[api] = left - 1
            return True

    def messages(self, open_kfid: str) -> list[dict[str, Any]]:
        """A copy of the kf account's message log (WeCom JSON items)."""
        with self._lock:
            return copy.deepcopy(self._logs.get(open_kfid, []))

    def texts_sent_to(self, customer: CustomerRef) -> list[str]:
        """Every text the customer got, in order, whether through send_msg or send_msg_on_event (welcome,
        closing, handoff notices; a msgmenu counts by its head_content)."""
        with self._lock:
            return [text for to, text in self._texts_sent if to == customer]

    def menus_sent_to(self, customer: CustomerRef) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
        """Every msgmenu the customer got through send_msg, in order: (head, (id, content) click items)."""
        with self._lock:
            return [(m.head, m.menu) for m in self.sent_menus if m.customer == customer]

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

    # --- internals -------------------------------------------------------------------------------------

    def _apply(self, message: InboundMessage) -> None:
        customer = message.customer
        if message.is_event and message.event is not None:
            self._apply_event(message)
        elif message.origin == 3 and customer.external_userid:
            session = self._session(customer)
            if session.state == 4:
                session.state = 0  # a new session (docs/wecom-kf.md)
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
        if event.event_type == "enter_session" and customer.external_userid:
            self._remember_entry(message)
        if event.welcome_code and event.welcome_code not in self._codes:
            self._codes[event.welcome_code] = EventCode(
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
            self._codes[event.msg_code] = EventCode(customer, self.clock() + ttl, msgtypes, session.state)

    def _remember_entry(self, message: InboundMessage) -> None:
        """batchget's enter_session_context: the newest entry, as the event carried it (raw item fields)."""
        for item in reversed(self._logs.get(message.open_kfid, [])):
            if item.get("msgid") == message.msgid:
                raw = item.get("event", {})
                context = {
                    k: copy.deepcopy(raw[k]) for k in ("scene", "scene_param", "wechat_channels") if k in raw
                }
                self.entry_contexts[message.external_userid] = (float(message.send_time), context)
                return

    def _session(self, customer: CustomerRef) -> Session:
        return self._sessions.setdefault(customer, Session())

    def _issue_code(self, customer: CustomerRef, ttl: float, msgtypes: set[str], state: int | None) -> str:
        code = self._next_id("code")
        self._codes[code] = EventCode(customer, self.clock() + ttl, frozenset(msgtypes), state)
        return code

    def _usable_code(self, code: str) -> EventCode | None:
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
