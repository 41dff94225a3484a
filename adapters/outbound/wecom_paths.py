"""The WeCom API paths this service calls (see docs/wecom-kf.md), relative to `<base>/cgi-bin/`.

Defined once: the real adapter, the in-memory fake and the HTTP emulator all name the APIs with these.
"""

from __future__ import annotations

from typing import Final

CGI_BIN: Final = "/cgi-bin/"

GETTOKEN: Final = "gettoken"
SYNC_MSG: Final = "kf/sync_msg"
SEND_MSG: Final = "kf/send_msg"
SEND_MSG_ON_EVENT: Final = "kf/send_msg_on_event"
SERVICE_STATE_GET: Final = "kf/service_state/get"
SERVICE_STATE_TRANS: Final = "kf/service_state/trans"
MEDIA_GET: Final = "media/get"
MEDIA_UPLOAD: Final = "media/upload"
CUSTOMER_BATCHGET: Final = "kf/customer/batchget"

APIS: Final = (
    GETTOKEN,
    SYNC_MSG,
    SEND_MSG,
    SEND_MSG_ON_EVENT,
    SERVICE_STATE_GET,
    SERVICE_STATE_TRANS,
    MEDIA_GET,
    MEDIA_UPLOAD,
    CUSTOMER_BATCHGET,
)
