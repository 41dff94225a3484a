"""`KfChannel` over the WeCom kf HTTP API (httpx), with a shared access-token cache.

Protocol: docs/wecom-kf.md (gettoken, sync_msg, send_msg, send_msg_on_event, service_state, media/get,
media/upload).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from adapters.outbound.outside_text import escape_outside_text as escape_outside_text
from adapters.outbound.wecom_client import DEFAULT_API_BASE as DEFAULT_API_BASE
from adapters.outbound.wecom_client import MAX_CONNECTIONS as MAX_CONNECTIONS
from adapters.outbound.wecom_client import WeComClient, as_int, as_str
from adapters.outbound.wecom_customers import MAX_IDS_PER_CALL, batchget_body, parse_batchget
from adapters.outbound.wecom_messages import parse_sync_item
from adapters.outbound.wecom_paths import (
    CUSTOMER_BATCHGET,
    MEDIA_UPLOAD,
    SEND_MSG,
    SEND_MSG_ON_EVENT,
    SERVICE_STATE_GET,
    SERVICE_STATE_TRANS,
    SYNC_MSG,
)
from application.errors import WeComError
from application.ports import ServiceState
from domain.customer import CustomerBatch
from domain.media import MediaBlob
from domain.messages import CustomerRef, SyncPage

_log = logging.getLogger(__name__)


class WeComKfChannel(WeComClient):
    """The KfChannel port (and the customer directory) over WeCom's kf API."""

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
        next_cursor = as_str(data.get("next_cursor")) or (cursor or "")
        return SyncPage(
            messages=tuple(m for m in parsed if m is not None),
            next_cursor=next_cursor,
            has_more=bool(as_int(data.get("has_more"))),
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
        return as_str(data.get("msgid")) or msgid

    async def get_service_state(self, customer: CustomerRef) -> ServiceState:
        body = {"open_kfid": customer.open_kfid, "external_userid": customer.external_userid}
        data = await self._call(SERVICE_STATE_GET, body)
        state = as_int(data.get("service_state"))
        if state is None:
            raise WeComError(None, "answer without service_state", api=SERVICE_STATE_GET)
        return ServiceState(state=state, servicer_userid=as_str(data.get("servicer_userid")))

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
        return as_str(data.get("msg_code"))

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
        return as_str(data.get("msgid")) or msgid

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
        media_id = as_str(answer.get("media_id"))
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
