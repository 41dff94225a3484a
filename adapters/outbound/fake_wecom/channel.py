"""`FakeKfChannel`: the `KfChannel` port in memory, driving a `KfWorld` that tests seed through `.world`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio.lowlevel

from adapters.outbound.fake_wecom.records import media_filename
from adapters.outbound.fake_wecom.world import KfWorld
from adapters.outbound.wecom_customers import parse_batchget
from adapters.outbound.wecom_messages import parse_sync_item
from adapters.outbound.wecom_paths import GETTOKEN, SEND_MSG, SEND_MSG_ON_EVENT
from application.errors import MediaTooLarge, WeComError
from application.ports import ServiceState
from domain.customer import CustomerBatch
from domain.media import MediaBlob
from domain.messages import CustomerRef, SyncPage


class FakeKfChannel:
    """The `KfChannel` port in memory, over a `KfWorld` (shared with the tests that seed it: `.world`)."""

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
        sent = self.world.send_msg(
            customer.open_kfid, customer.external_userid, "text", {"content": text}, msgid=msgid
        )
        return self._answer_or_lost(SEND_MSG, sent)

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
            sent = self.world.send_on_event(code, "msgmenu", body, msgid=msgid)
        else:
            sent = self.world.send_on_event(code, "text", {"content": text}, msgid=msgid)
        return self._answer_or_lost(SEND_MSG_ON_EVENT, sent)

    async def send_menu(
        self, customer: CustomerRef, head: str, items: Sequence[tuple[str, str]], *, msgid: str
    ) -> str:
        await anyio.lowlevel.checkpoint()
        body = {
            "head_content": head,
            "list": [{"type": "click", "click": {"id": i, "content": c}} for i, c in items],
        }
        return self.world.send_msg(customer.open_kfid, customer.external_userid, "msgmenu", body, msgid=msgid)

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
        sent = self.world.send_msg(
            customer.open_kfid, customer.external_userid, "image", {"media_id": media_id}, msgid=msgid
        )
        return self._answer_or_lost(SEND_MSG, sent)

    def _answer_or_lost(self, api: str, msgid: str) -> str:
        """The call took effect; `world.lose_response_next` makes its answer a transport failure, as the
        real adapter reports a timeout or a dropped connection."""
        if self.world.take_lost_response(api):
            raise WeComError(None, f"{api} unreachable: ReadTimeout", api=api)
        return msgid

    # --- CustomerDirectory -----------------------------------------------------------------------------

    async def get_customers(self, external_userids: Sequence[str], *, with_context: bool) -> CustomerBatch:
        await anyio.lowlevel.checkpoint()
        answer = self.world.batchget(list(external_userids), with_context=with_context)
        return parse_batchget(answer, now=self.world.clock())
