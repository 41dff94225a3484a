"""The rules the fake WeCom kf enforces: errcodes, limits, session states, and the checks of request fields.

From docs/wecom-kf.md. Where WeCom's errcode is NOT VERIFIED the fake picks one, marked "chosen": callers must
only rely on "it is a WeComError".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from adapters.outbound.wecom_paths import SEND_MSG_ON_EVENT
from application.errors import WeComError

# errcodes (docs/wecom-kf.md, error codes).
ERR_INVALID_PARAM = 40058  # bad/missing field, text > 2048 bytes, bad msgid, bad cursor
ERR_DUPLICATE_MSGID = 40058  # chosen: a msgid reused within a kf account (docs/wecom-kf.md)
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
# media (docs/wecom-kf.md)
ERR_BAD_MEDIA_TYPE = 40004
ERR_BAD_TYPE_PARAM = 40005
ERR_BAD_FILE_SIZE = 40006
ERR_INVALID_MEDIA_ID = 40007
ERR_IMAGE_SIZE = 40009
ERR_VIDEO_SIZE = 40011
ERR_EMPTY_MEDIA = 44001
# kf/customer/batchget (docs/wecom-kf.md §11)
ERR_NO_CUSTOMER_PERMISSION = 48002  # the app may not read customer info
MAX_BATCHGET_IDS = 100
MEDIA_TTL_S = 3 * 86400  # media_id lives 3 days
SEND_MEDIA_MSGTYPES = frozenset({"image", "voice", "video", "file"})

MAX_TEXT_BYTES = 2048
MAX_MENU_TEXT_BYTES = 1024
MAX_MENU_ITEMS = 10
MAX_MSGID_BYTES = 32
MAX_CURSOR_BYTES = 64
MAX_SYNC_TOKEN_BYTES = 128
MAX_SYNC_LIMIT = 1000
SEND_QUOTA = 5  # messages per customer message (docs/wecom-kf.md)
SESSION_WINDOW_S = 48 * 3600
HISTORY_S = 3 * 86400  # sync_msg without cursor starts at the earliest message of the last 3 days
WELCOME_CODE_TTL_S = 20.0  # docs/wecom-kf.md: welcome and closing codes
LONG_CODE_TTL_S = 48 * 3600.0  # queue and pick-up codes

# service_state moves allowed through `trans` (docs/wecom-kf.md). 0 only comes from a customer message;
# nothing leaves 4 through the API.
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


def invalid(api: str, errmsg: str) -> WeComError:
    return WeComError(ERR_INVALID_PARAM, f"invalid parameter: {errmsg}", api=api)


def check_msgid(api: str, msgid: object) -> None:
    if not isinstance(msgid, str) or len(msgid.encode()) > MAX_MSGID_BYTES or not _MSGID_RE.fullmatch(msgid):
        raise invalid(api, "msgid must be at most 32 bytes of [0-9a-zA-Z_-]")


def check_text(api: str, content: object, max_bytes: int) -> str:
    if content is None or content == "":
        raise WeComError(ERR_EMPTY_CONTENT, "empty content", api=api)
    if not isinstance(content, str):
        raise invalid(api, "content must be a string")
    if len(content.encode()) > max_bytes:
        raise invalid(api, f"content longer than {max_bytes} bytes")
    return content


def check_menu(
    body: Mapping[str, Any], api: str = SEND_MSG_ON_EVENT
) -> tuple[str, tuple[tuple[str, str], ...]]:
    head = body.get("head_content", "")
    tail = body.get("tail_content", "")
    for part in (head, tail):
        if not isinstance(part, str) or len(part.encode()) > MAX_MENU_TEXT_BYTES:
            raise invalid(api, "head_content/tail_content must be strings of at most 1024 bytes")
    items = body.get("list", [])
    if not isinstance(items, list):
        raise invalid(api, "list must be an array")
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
            raise invalid(api, "menu item content required")
        if kind == "click":
            item_id = sub.get("id", "")
            if not isinstance(item_id, str) or len(item_id.encode()) > 128 or len(content.encode()) > 128:
                raise invalid(api, "click id/content at most 128 bytes")
            menu.append((item_id, content))
    if not head and not menu:
        raise WeComError(ERR_EMPTY_CONTENT, "empty menu", api=api)
    return head, tuple(menu)
