"""`KfWorld`: the fake WeCom kf's API calls over `KfState`, checked by the rules of docs/wecom-kf.md.

Both faces drive one `KfWorld`: `FakeKfChannel` in-process, and the HTTP emulator
(tests/support/wecom_server.py) behind the real API. API methods raise `WeComError`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from adapters.outbound.fake_wecom.records import (
    SentMedia,
    SentMenu,
    SentOnEvent,
    SentText,
    StoredMedia,
    SyncRequest,
    SyncResult,
)
from adapters.outbound.fake_wecom.rules import (
    ALLOWED_TRANSITIONS,
    ERR_BAD_CODE,
    ERR_BAD_FILE_SIZE,
    ERR_BAD_MEDIA_TYPE,
    ERR_BAD_TYPE_PARAM,
    ERR_EMPTY_MEDIA,
    ERR_ILLEGAL_TRANSITION,
    ERR_IMAGE_SIZE,
    ERR_INVALID_MEDIA_ID,
    ERR_NO_CUSTOMER_PERMISSION,
    ERR_NOT_SERVICER,
    ERR_OUTSIDE_48H,
    ERR_SEND_QUOTA,
    ERR_SERVICER_STOPPED,
    ERR_SESSION_NOT_SENDABLE,
    ERR_VIDEO_SIZE,
    LONG_CODE_TTL_S,
    MAX_BATCHGET_IDS,
    MAX_CURSOR_BYTES,
    MAX_SYNC_LIMIT,
    MAX_SYNC_TOKEN_BYTES,
    MAX_TEXT_BYTES,
    MEDIA_TTL_S,
    SEND_MEDIA_MSGTYPES,
    SENDABLE_STATES,
    SERVICER_RECEIVING,
    SESSION_WINDOW_S,
    check_menu,
    check_msgid,
    check_text,
    invalid,
)
from adapters.outbound.fake_wecom.state import KfState
from adapters.outbound.wecom_paths import (
    CUSTOMER_BATCHGET,
    MEDIA_GET,
    MEDIA_UPLOAD,
    SEND_MSG,
    SEND_MSG_ON_EVENT,
    SERVICE_STATE_GET,
    SERVICE_STATE_TRANS,
    SYNC_MSG,
)
from application.errors import WeComError
from application.ports import ServiceState
from domain.media import (
    WECOM_UPLOAD_CAPS,
    WECOM_UPLOAD_IMAGE_TYPES,
    WECOM_UPLOAD_MIN_BYTES,
    bare_type,
    sniff_type,
)
from domain.messages import CustomerRef


class KfWorld(KfState):
    """The WeCom kf API in memory: sync_msg, send_msg, send_msg_on_event, service_state, media get/upload."""

    def sync(self, open_kfid: str, *, cursor: str | None, token: str | None, limit: int) -> SyncResult:
        with self._lock:
            self.check_failure(SYNC_MSG)
            self.sync_requests.append(SyncRequest(open_kfid, cursor, token, limit))
            if not open_kfid:
                raise invalid(SYNC_MSG, "open_kfid required")
            if cursor and len(cursor.encode()) > MAX_CURSOR_BYTES:
                raise invalid(SYNC_MSG, "cursor too long")
            if token and len(token.encode()) > MAX_SYNC_TOKEN_BYTES:
                raise invalid(SYNC_MSG, "token too long")
            log = self._logs.get(open_kfid, [])
            if cursor:
                # Cursor scope is NOT VERIFIED (docs/wecom-kf.md): the fake binds a cursor to its kf account.
                kf_and_pos = self._cursors.get(cursor)
                if kf_and_pos is None or kf_and_pos[0] != open_kfid:
                    raise invalid(SYNC_MSG, "invalid cursor")
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
        """`kf/send_msg` (text, msgmenu and uploaded media in the fake); returns the msgid."""
        with self._lock:
            self.check_failure(SEND_MSG)
            if not open_kfid or not touser:
                raise invalid(SEND_MSG, "touser and open_kfid required")
            check_msgid(SEND_MSG, msgid)
            menu: tuple[tuple[str, str], ...] = ()
            if msgtype in SEND_MEDIA_MSGTYPES:
                media_id = body.get("media_id")
                stored = self.media.get(media_id) if isinstance(media_id, str) else None
                if stored is None or not stored.uploaded or stored.kind != msgtype or self._expired(stored):
                    raise WeComError(ERR_INVALID_MEDIA_ID, "invalid media_id", api=SEND_MSG)
                text = ""
            elif msgtype == "msgmenu":
                text, menu = check_menu(body, SEND_MSG)
            elif msgtype != "text":
                raise invalid(SEND_MSG, f"msgtype {msgtype!r} not supported by the fake")
            else:
                text = check_text(SEND_MSG, body.get("content"), MAX_TEXT_BYTES)
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
            session.state = 1  # sending via the API hands the session to the bot (docs/wecom-kf.md)
            msgid = self._claim_msgid(open_kfid, msgid)
            if msgtype == "text":
                self.sent.append(SentText(customer, text, msgid))
                self._texts_sent.append((customer, text))
            elif msgtype == "msgmenu":
                self.sent_menus.append(SentMenu(customer, text, menu, msgid))
            else:
                self.sent_media.append(SentMedia(customer, msgtype, str(body["media_id"]), msgid))
            return msgid

    def media_get(self, media_id: str) -> StoredMedia:
        """`media/get`: unknown, malformed or expired media is 40007 (docs/wecom-kf.md)."""
        with self._lock:
            self.check_failure(MEDIA_GET)
            stored = self.media.get(media_id)
            if stored is None or self._expired(stored):
                raise WeComError(ERR_INVALID_MEDIA_ID, "invalid media_id", api=MEDIA_GET)
            return stored

    def media_upload(self, kind: str, filename: str, content_type: str, data: bytes) -> str:
        """`media/upload` with the checks of docs/wecom-kf.md; returns the media_id."""
        api = MEDIA_UPLOAD
        with self._lock:
            self.check_failure(api)
            if kind not in WECOM_UPLOAD_CAPS:
                raise WeComError(ERR_BAD_TYPE_PARAM, "invalid media type param", api=api)
            if not data:
                raise WeComError(ERR_EMPTY_MEDIA, "empty media data", api=api)
            if not filename:
                raise invalid(api, "media part without filename")
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
        """`kf/send_msg_on_event`: text or msgmenu, once per code (docs/wecom-kf.md); returns the msgid."""
        with self._lock:
            self.check_failure(SEND_MSG_ON_EVENT)
            check_msgid(SEND_MSG_ON_EVENT, msgid)
            entry = self._usable_code(code)
            if entry is None:
                raise WeComError(ERR_BAD_CODE, "invalid msg code", api=SEND_MSG_ON_EVENT)
            if msgtype not in entry.msgtypes:
                raise invalid(SEND_MSG_ON_EVENT, f"msgtype {msgtype!r} not allowed for this code")
            menu: tuple[tuple[str, str], ...] = ()
            if msgtype == "text":
                text = check_text(SEND_MSG_ON_EVENT, body.get("content"), MAX_TEXT_BYTES)
            else:
                text, menu = check_menu(body)
            open_kfid = entry.customer.open_kfid
            self._check_unique(SEND_MSG_ON_EVENT, open_kfid, msgid)
            entry.used = True
            msgid = self._claim_msgid(open_kfid, msgid)
            self.sent_on_event.append(SentOnEvent(code, entry.customer, text, msgid, menu))
            self._texts_sent.append((entry.customer, text))
            return msgid

    def get_state(self, customer: CustomerRef) -> ServiceState:
        with self._lock:
            self.check_failure(SERVICE_STATE_GET)
            if not customer.open_kfid or not customer.external_userid:
                raise invalid(SERVICE_STATE_GET, "open_kfid and external_userid required")
            session = self._session(customer)
            return ServiceState(session.state, session.servicer_userid if session.state == 3 else "")

    def transfer(self, customer: CustomerRef, state: int, servicer_userid: str = "") -> str:
        """`service_state/trans`; returns the msg_code ("" when none is due)."""
        with self._lock:
            self.check_failure(SERVICE_STATE_TRANS)
            if not customer.open_kfid or not customer.external_userid:
                raise invalid(SERVICE_STATE_TRANS, "open_kfid and external_userid required")
            if state not in ALLOWED_TRANSITIONS:
                raise invalid(SERVICE_STATE_TRANS, "invalid service_state")
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

    # --- kf/customer/batchget (docs/wecom-kf.md §11) ----------------------------------------------------

    def batchget(self, external_userids: object, *, with_context: bool) -> dict[str, Any]:
        """`kf/customer/batchget`: {"customer_list": [...], "invalid_external_userid": [...]}, as WeCom
        answers.
        Customers are known when seeded (`add_customer_profile`) or once they wrote or entered a session;
        the entry context comes only for customers active within the last 48 h."""
        with self._lock:
            self.check_failure(CUSTOMER_BATCHGET)
            if not isinstance(external_userids, list) or not external_userids:
                raise invalid(CUSTOMER_BATCHGET, "external_userid_list required")
            if len(external_userids) > MAX_BATCHGET_IDS:
                raise invalid(CUSTOMER_BATCHGET, f"at most {MAX_BATCHGET_IDS} external_userid")
            if CUSTOMER_BATCHGET in self.forbidden_apis:
                raise WeComError(ERR_NO_CUSTOMER_PERMISSION, "api forbidden", api=CUSTOMER_BATCHGET)
            found: list[dict[str, Any]] = []
            invalid_ids: list[str] = []
            for userid in dict.fromkeys(external_userids):
                if not isinstance(userid, str):
                    raise invalid(CUSTOMER_BATCHGET, "external_userid must be a string")
                entry = self._customer_entry(userid, with_context=with_context)
                if entry is None:
                    invalid_ids.append(userid)
                else:
                    found.append(entry)
            return {"customer_list": found, "invalid_external_userid": invalid_ids}

    def _customer_entry(self, userid: str, *, with_context: bool) -> dict[str, Any] | None:
        profile = self.customer_profiles.get(userid)
        if profile is None and not self._has_written(userid) and userid not in self.entry_contexts:
            return None
        entry = (
            copy.deepcopy(profile)
            if profile is not None
            else {
                "external_userid": userid,
                "nickname": "微信用户",
                "avatar": "",
                "gender": 0,
                "unionid": "",
            }
        )
        if not self.unionid_bound or not entry.get("unionid"):
            entry.pop("unionid", None)
        if with_context:
            seen = self.entry_contexts.get(userid)
            if seen is not None and self.clock() - seen[0] <= SESSION_WINDOW_S:
                entry["enter_session_context"] = copy.deepcopy(seen[1])
        return entry

    def _has_written(self, userid: str) -> bool:
        return any(c.external_userid == userid for c in self._sessions)
