"""An in-memory WeCom kf: one state machine (`KfWorld`) with two faces.

- `FakeKfChannel` drives it in-process and implements the `KfChannel` port for unit tests;
- `tests.support.wecom_server.FakeWeComServer` serves the same `KfWorld` behind the real HTTP API.

Tests seed and inspect the world itself (`channel.world.add_customer_text(...)`, `server.world.sent`). Both
faces pass tests/contract/test_kf_channel.py.

Modules: rules.py (errcodes, limits, field checks), records.py (what the world keeps), state.py (`KfState`:
state, seeding, effects of messages), world.py (`KfWorld`: the API calls), channel.py (`FakeKfChannel`).
"""

from adapters.outbound.fake_wecom.channel import FakeKfChannel
from adapters.outbound.fake_wecom.records import (
    SentMedia,
    SentMenu,
    SentOnEvent,
    SentText,
    StoredMedia,
    SyncRequest,
    SyncResult,
    media_filename,
)
from adapters.outbound.fake_wecom.rules import SERVICER_RECEIVING, SERVICER_STOPPED
from adapters.outbound.fake_wecom.world import KfWorld

__all__ = [
    "SERVICER_RECEIVING",
    "SERVICER_STOPPED",
    "FakeKfChannel",
    "KfWorld",
    "SentMedia",
    "SentMenu",
    "SentOnEvent",
    "SentText",
    "StoredMedia",
    "SyncRequest",
    "SyncResult",
    "media_filename",
]
