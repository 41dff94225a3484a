"""The `KfChannel` contract: the in-memory fake and the real adapter over HTTP must behave the same.

`emulated` runs `WeComKfChannel` over real HTTP against `FakeWeComServer`; both faces drive one `KfWorld`,
which the tests seed through `KfHarness`. Errcodes WeCom does not document (duplicate msgid, text too long,
used event code — docs/wecom-kf.md) are only pinned as "a WeComError with an errcode".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld, SentMedia
from adapters.outbound.wecom_api import WeComKfChannel
from adapters.outbound.wecom_paths import SEND_MSG, SEND_MSG_ON_EVENT
from application.errors import MediaTooLarge, WeComError
from application.ports import KfChannel, ServiceState
from application.reply_session import refuses_repeated_msgid
from domain.messages import CustomerRef, InboundMessage, KfEvent, Origin, SyncPage
from tests.support import media_samples
from tests.support.http_server import serve
from tests.support.wecom_server import FakeWeComServer

pytestmark = pytest.mark.anyio

KF = "wkKF000001"
ALICE = CustomerRef(KF, "wmALICE0001")
BOB = CustomerRef(KF, "wmBOB000002")
T0 = 1_750_000_000.0
MB = 1024 * 1024


class ManualClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class KfHarness:
    """What a contract test needs from either side: the port, and the world behind it to seed and inspect."""

    channel: KfChannel
    world: KfWorld
    clock: ManualClock

    def customer_says(self, customer: CustomerRef, text: str) -> str:
        return self.world.add_customer_text(customer.open_kfid, customer.external_userid, text)

    async def drain(
        self, *, cursor: str | None = None, limit: int = 1000
    ) -> tuple[list[InboundMessage], str]:
        """Pull until has_more is 0, as the bot does; returns every message and the last cursor."""
        messages: list[InboundMessage] = []
        for _ in range(50):
            page = await self.channel.sync_messages(KF, cursor=cursor, token=None, limit=limit)
            messages.extend(page.messages)
            cursor = page.next_cursor
            if not page.has_more:
                return messages, cursor
        raise AssertionError("sync_msg never reported has_more=0")


@pytest.fixture(scope="module")
def served_wecom() -> Iterator[tuple[FakeWeComServer, str]]:
    """One real HTTP server for the module; each test gets a fresh world through `reset`."""
    server = FakeWeComServer()
    with serve(server.app) as base_url:
        yield server, base_url


@pytest.fixture(params=["fake", "emulated"])
async def kf(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[KfHarness]:
    clock = ManualClock()
    world = KfWorld(clock=clock)
    world.add_servicer("zhangsan")
    world.add_servicer("lisi")
    if request.param == "fake":
        yield KfHarness(FakeKfChannel(world), world, clock)
        return
    server, base_url = request.getfixturevalue("served_wecom")
    server.reset(world)
    channel = WeComKfChannel(
        corp_id=server.corp_id, corp_secret=server.corp_secret, api_base=base_url, timeout=5
    )
    try:
        yield KfHarness(channel, world, clock)
    finally:
        await channel.aclose()


@pytest.fixture
def channel(kf: KfHarness) -> KfChannel:
    return kf.channel


class TestSyncMessages:
    async def test_first_sync_without_cursor_returns_the_history_from_the_start(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        first = kf.customer_says(ALICE, "你好")
        second = kf.customer_says(BOB, "hello")
        third = kf.customer_says(ALICE, "在吗")

        page = await channel.sync_messages(KF, cursor=None, token=None)

        assert [m.msgid for m in page.messages] == [first, second, third]
        assert page.has_more is False
        assert page.next_cursor
        message = page.messages[0]
        assert (message.open_kfid, message.external_userid, message.text) == (
            KF,
            ALICE.external_userid,
            "你好",
        )
        assert message.origin is Origin.CUSTOMER and message.is_from_customer
        assert message.send_time == int(T0)

    async def test_cursor_continues_after_the_last_message_seen(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "one")
        page = await channel.sync_messages(KF, cursor=None, token=None)
        new = kf.customer_says(ALICE, "two")

        again = await channel.sync_messages(KF, cursor=page.next_cursor, token=None)
        assert [m.msgid for m in again.messages] == [new]

        nothing = await channel.sync_messages(KF, cursor=again.next_cursor, token=None)
        assert nothing.messages == () and nothing.has_more is False

    async def test_pages_by_limit_with_has_more(self, kf: KfHarness, channel: KfChannel) -> None:
        sent = [kf.customer_says(ALICE, f"m{i}") for i in range(5)]

        pages: list[SyncPage] = []
        cursor = None
        for _ in range(3):
            page = await channel.sync_messages(KF, cursor=cursor, token=None, limit=2)
            pages.append(page)
            cursor = page.next_cursor

        assert [len(p.messages) for p in pages] == [2, 2, 1]
        assert [p.has_more for p in pages] == [True, True, False]
        assert [m.msgid for p in pages for m in p.messages] == sent

    async def test_an_empty_page_with_has_more_is_not_the_end(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        msgid = kf.customer_says(ALICE, "hi")
        kf.world.inject_empty_pages(KF, 2)

        first = await channel.sync_messages(KF, cursor=None, token=None)
        assert first.messages == () and first.has_more is True

        messages, _ = await kf.drain(cursor=first.next_cursor)
        assert [m.msgid for m in messages] == [msgid]

    async def test_history_older_than_three_days_is_not_returned(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.world.add_customer_text(KF, ALICE.external_userid, "old", send_time=int(T0 - 4 * 86400))
        recent = kf.customer_says(ALICE, "recent")

        messages, _ = await kf.drain()
        assert [m.msgid for m in messages] == [recent]

    async def test_servicer_messages_and_events_come_back_classified(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.world.add_servicer_text(KF, ALICE.external_userid, "zhangsan", "我是人工")
        _, welcome = kf.world.add_enter_session(KF, BOB.external_userid, scene="sc1", scene_param="a%3Db")
        kf.world.add_event(
            KF, "msg_send_fail", external_userid=ALICE.external_userid, fail_msgid="x1", fail_type=4
        )

        messages, _ = await kf.drain()

        servicer, enter, fail = messages
        assert (
            servicer.origin is Origin.SERVICER and servicer.is_from_servicer and not servicer.is_from_customer
        )
        assert servicer.extra["servicer_userid"] == "zhangsan"
        assert enter.is_event and enter.origin is Origin.SYSTEM and enter.customer == BOB
        assert enter.event == KfEvent(
            event_type="enter_session",
            open_kfid=KF,
            external_userid=BOB.external_userid,
            welcome_code=welcome,
            scene="sc1",
            scene_param="a%3Db",
        )
        assert fail.event is not None and (fail.event.fail_msgid, fail.event.fail_type) == ("x1", 4)

    async def test_other_kf_accounts_are_not_mixed_in(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.world.add_customer_text("wkOTHER", "wmX", "elsewhere")
        mine = kf.customer_says(ALICE, "mine")

        messages, _ = await kf.drain()
        assert [m.msgid for m in messages] == [mine]

    async def test_a_pushed_domain_message_comes_back_equal(self, kf: KfHarness, channel: KfChannel) -> None:
        message = InboundMessage(
            msgid="from_msgid_1",
            open_kfid=KF,
            external_userid=ALICE.external_userid,
            send_time=int(T0),
            origin=Origin.CUSTOMER,
            msgtype="image",
            media_id="MEDIA_1",
        )
        kf.world.push(message)

        messages, _ = await kf.drain()
        assert messages == [message]


class TestSendText:
    async def test_success_returns_the_msgid_and_claims_a_new_session(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        assert await channel.get_service_state(ALICE) == ServiceState(0)

        msgid = await channel.send_text(ALICE, "您好！", msgid="reply_1")

        assert msgid == "reply_1"
        assert kf.world.sent == [(ALICE, "您好！", "reply_1")]
        assert await channel.get_service_state(ALICE) == ServiceState(1)

    async def test_2048_bytes_are_accepted_and_more_are_rejected(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        await channel.send_text(ALICE, "好" * 682 + "ab", msgid="fits")  # 2048 bytes

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "好" * 683, msgid="too_long")  # 2049 bytes
        assert caught.value.errcode not in (None, 0)
        assert [s.msgid for s in kf.world.sent] == ["fits"]

    async def test_empty_text_is_rejected(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.customer_says(ALICE, "hi")
        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "", msgid="empty")
        assert caught.value.errcode == 44004

    async def test_a_duplicate_msgid_is_rejected(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.customer_says(ALICE, "hi")
        await channel.send_text(ALICE, "first", msgid="same_id")

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "second", msgid="same_id")
        assert caught.value.errcode not in (None, 0)
        assert [s.text for s in kf.world.sent] == ["first"]

    async def test_the_sixth_message_per_customer_message_hits_the_quota(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        for part in range(5):
            await channel.send_text(ALICE, f"part {part}", msgid=f"p{part}")

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "part 5", msgid="p5")
        assert caught.value.errcode == 95001

        kf.customer_says(ALICE, "more please")
        assert await channel.send_text(ALICE, "part 5", msgid="p5") == "p5"

    @pytest.mark.parametrize("state", [2, 3])
    async def test_a_queued_or_human_session_refuses_api_messages(
        self, kf: KfHarness, channel: KfChannel, state: int
    ) -> None:
        kf.customer_says(ALICE, "hi")
        kf.world.set_service_state(ALICE, state, "zhangsan" if state == 3 else "")

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "bot here", msgid="r1")
        assert caught.value.errcode == WeComError.SESSION_NOT_SENDABLE
        assert kf.world.sent == []

    async def test_a_customer_who_never_wrote_cannot_be_messaged(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        with pytest.raises(WeComError) as caught:
            await channel.send_text(BOB, "hello?", msgid="r1")
        assert caught.value.errcode == WeComError.SESSION_NOT_SENDABLE


class TestServiceState:
    async def test_a_session_is_ended_until_the_customer_writes(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        assert await channel.get_service_state(ALICE) == ServiceState(4)
        kf.customer_says(ALICE, "hi")
        assert await channel.get_service_state(ALICE) == ServiceState(0)

    async def test_handing_over_to_a_servicer_returns_a_code_once(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "人工")

        code = await channel.transfer_service_state(ALICE, state=3, servicer_userid="zhangsan")
        assert code
        assert await channel.get_service_state(ALICE) == ServiceState(3, "zhangsan")

        again = await channel.transfer_service_state(ALICE, state=3, servicer_userid="lisi")
        assert again == ""
        assert await channel.get_service_state(ALICE) == ServiceState(3, "lisi")

    async def test_the_bot_can_claim_a_new_session_without_a_code(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        assert await channel.transfer_service_state(ALICE, state=1) == ""
        assert await channel.get_service_state(ALICE) == ServiceState(1)

    async def test_an_unknown_servicer_is_refused(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.customer_says(ALICE, "hi")
        with pytest.raises(WeComError) as caught:
            await channel.transfer_service_state(ALICE, state=3, servicer_userid="nobody")
        assert caught.value.errcode == 95014
        with pytest.raises(WeComError) as caught:
            await channel.transfer_service_state(ALICE, state=3)
        assert caught.value.errcode == 95014
        assert await channel.get_service_state(ALICE) == ServiceState(0)

    @pytest.mark.parametrize(
        ("start", "target"), [(4, 0), (4, 1), (1, 0), (1, 4), (2, 1), (3, 1), (0, 0)], ids=lambda v: str(v)
    )
    async def test_illegal_transitions_are_refused(
        self, kf: KfHarness, channel: KfChannel, start: int, target: int
    ) -> None:
        kf.customer_says(ALICE, "hi")
        kf.world.set_service_state(ALICE, start, "zhangsan" if start == 3 else "")

        with pytest.raises(WeComError) as caught:
            await channel.transfer_service_state(ALICE, state=target)
        assert caught.value.errcode == 95016
        assert (await channel.get_service_state(ALICE)).state == start

    async def test_ending_a_human_session_returns_a_closing_code(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        await channel.transfer_service_state(ALICE, state=3, servicer_userid="zhangsan")

        closing = await channel.transfer_service_state(ALICE, state=4)

        assert closing
        assert await channel.get_service_state(ALICE) == ServiceState(4)
        assert await channel.send_on_event(closing, "感谢咨询", msgid="bye_1") == "bye_1"


class TestSendOnEvent:
    async def test_a_welcome_code_is_single_use(self, kf: KfHarness, channel: KfChannel) -> None:
        _, code = kf.world.add_enter_session(KF, ALICE.external_userid)

        assert await channel.send_on_event(code, "欢迎光临", msgid="welcome_1") == "welcome_1"
        with pytest.raises(WeComError) as caught:
            await channel.send_on_event(code, "欢迎光临", msgid="welcome_2")
        assert caught.value.errcode not in (None, 0)
        assert [(s.customer, s.text) for s in kf.world.sent_on_event] == [(ALICE, "欢迎光临")]

    async def test_a_welcome_code_expires_after_twenty_seconds(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        _, code = kf.world.add_enter_session(KF, ALICE.external_userid)
        kf.clock.advance(21)

        with pytest.raises(WeComError):
            await channel.send_on_event(code, "欢迎光临", msgid="welcome_1")

    async def test_a_welcome_menu_is_sent_as_click_items(self, kf: KfHarness, channel: KfChannel) -> None:
        _, code = kf.world.add_enter_session(KF, ALICE.external_userid)

        await channel.send_on_event(
            code, "请选择", msgid="menu_1", menu=[("human", "转人工"), ("faq", "常见问题")]
        )

        (sent,) = kf.world.sent_on_event
        assert (sent.text, sent.menu) == ("请选择", (("human", "转人工"), ("faq", "常见问题")))

    async def test_an_unknown_code_is_refused(self, kf: KfHarness, channel: KfChannel) -> None:
        with pytest.raises(WeComError) as caught:
            await channel.send_on_event("no-such-code", "hi", msgid="x")
        assert caught.value.errcode not in (None, 0)


class TestErrors:
    @pytest.mark.parametrize("errcode", [-1, 95000, 45009])
    async def test_an_errcode_surfaces_as_wecom_error(
        self, kf: KfHarness, channel: KfChannel, errcode: int
    ) -> None:
        kf.customer_says(ALICE, "hi")
        kf.world.fail_next("kf/send_msg", errcode)

        with pytest.raises(WeComError) as caught:
            await channel.send_text(ALICE, "hello", msgid="r1")
        assert caught.value.errcode == errcode

        assert await channel.send_text(ALICE, "hello", msgid="r1") == "r1"  # the failure was one-off

    async def test_sync_failures_surface_too(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.world.fail_next("kf/sync_msg", 95007)
        with pytest.raises(WeComError) as caught:
            await channel.sync_messages(KF, cursor=None, token="expired")
        assert caught.value.errcode == 95007

    async def test_check_access_reports_a_refused_token(self, kf: KfHarness, channel: KfChannel) -> None:
        await channel.check_access()
        kf.world.fail_next("gettoken", 60020)
        with pytest.raises(WeComError) as caught:
            await channel.check_access()
        assert caught.value.errcode == 60020 and caught.value.is_config_error


class TestMedia:
    async def test_a_customers_image_downloads_with_its_bytes_type_and_name(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        image = media_samples.png()
        msgid, media_id = kf.world.add_customer_media(KF, ALICE.external_userid, "image", image, "image/png")

        (message,), _ = await kf.drain()
        blob = await channel.download_media(message.media_id, max_bytes=2 * MB)

        assert (message.msgid, message.media_id, message.kind.value) == (msgid, media_id, "image")
        assert blob.data == image
        assert blob.content_type.startswith("image/png")
        assert blob.filename == f"{media_id}.png"  # WeCom names images MEDIA_ID.ext (docs/wecom-kf.md)

    async def test_a_file_keeps_the_name_the_customer_gave_it(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        document = media_samples.pdf()
        _, media_id = kf.world.add_customer_media(
            KF, ALICE.external_userid, "file", document, "application/pdf", filename="季度报告 (终稿).pdf"
        )

        blob = await channel.download_media(media_id, max_bytes=20 * MB)

        assert (blob.data, blob.filename) == (document, "季度报告 (终稿).pdf")

    @pytest.mark.parametrize(
        ("content_type", "filename"), [("application/json", "a.json"), ("text/plain", "a.txt")]
    )
    async def test_a_file_that_reads_like_an_errcode_is_still_a_file(
        self, kf: KfHarness, channel: KfChannel, content_type: str, filename: str
    ) -> None:
        body = b'{"errcode":40014,"errmsg":"x\\r\\nFAKE LOG"}'
        _, media_id = kf.world.add_customer_media(
            KF, ALICE.external_userid, "file", body, content_type, filename=filename
        )

        blob = await channel.download_media(media_id, max_bytes=MB)

        assert (blob.data, blob.filename) == (body, filename)
        assert blob.content_type.startswith(content_type)

    async def test_unknown_media_is_40007(self, kf: KfHarness, channel: KfChannel) -> None:
        with pytest.raises(WeComError) as caught:
            await channel.download_media("no-such-media", max_bytes=MB)
        assert caught.value.errcode == 40007

    async def test_media_expires_after_three_days(self, kf: KfHarness, channel: KfChannel) -> None:
        _, media_id = kf.world.add_customer_media(
            KF, ALICE.external_userid, "image", media_samples.png(), "image/png"
        )
        kf.clock.advance(3 * 86400 + 1)

        with pytest.raises(WeComError) as caught:
            await channel.download_media(media_id, max_bytes=MB)
        assert caught.value.errcode == 40007

    async def test_media_over_max_bytes_is_media_too_large(self, kf: KfHarness, channel: KfChannel) -> None:
        big = media_samples.png(noise=300_000)
        _, media_id = kf.world.add_customer_media(KF, ALICE.external_userid, "image", big, "image/png")

        with pytest.raises(MediaTooLarge) as caught:
            await channel.download_media(media_id, max_bytes=100_000)
        assert caught.value.limit_bytes == 100_000

    async def test_a_media_get_failure_surfaces_as_wecom_error(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        _, media_id = kf.world.add_customer_media(
            KF, ALICE.external_userid, "image", media_samples.png(), "image/png"
        )
        kf.world.fail_next("media/get", 45033)

        with pytest.raises(WeComError) as caught:
            await channel.download_media(media_id, max_bytes=MB)
        assert caught.value.errcode == 45033

    async def test_an_uploaded_png_is_sent_as_an_image_message(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "有图吗")
        image = media_samples.png()

        media_id = await channel.upload_media("image", "answer.png", "image/png", image)
        msgid = await channel.send_image(ALICE, media_id, msgid="img_1")

        assert msgid == "img_1"
        assert kf.world.sent_media == [SentMedia(ALICE, "image", media_id, "img_1")]
        stored = kf.world.media[media_id]
        assert (stored.data, stored.filename, stored.kind) == (image, "answer.png", "image")
        assert kf.world.sent == []  # an image is not a text

    async def test_a_jpeg_is_accepted_too(self, kf: KfHarness, channel: KfChannel) -> None:
        image = media_samples.jpeg()
        if image is None:
            pytest.skip("no ffmpeg to make a JPEG")

        media_id = await channel.upload_media("image", "photo.jpg", "image/jpeg", image)

        assert kf.world.media[media_id].data == image

    async def test_images_and_texts_share_the_five_message_quota(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        media_id = await channel.upload_media("image", "a.png", "image/png", media_samples.png())
        for part in range(3):
            await channel.send_text(ALICE, f"part {part}", msgid=f"t{part}")
        await channel.send_image(ALICE, media_id, msgid="i0")
        await channel.send_image(ALICE, media_id, msgid="i1")

        with pytest.raises(WeComError) as caught:
            await channel.send_image(ALICE, media_id, msgid="i2")
        assert caught.value.errcode == 95001

    @pytest.mark.parametrize(
        ("kind", "sample", "errcode"),
        [
            ("image", "gif", 40004),  # images must be JPG or PNG
            ("image", "untyped", 40004),  # ... and say so in the part's Content-Type
            ("image", "tiny", 40006),  # every file must be larger than 5 bytes
            ("image", "huge", 40009),  # images at most 10 MB
            ("voice", "png", 40004),  # voice must be AMR
            ("sticker", "png", 40005),  # no such type
        ],
    )
    async def test_upload_refuses_what_wecom_refuses(
        self, kf: KfHarness, channel: KfChannel, kind: str, sample: str, errcode: int
    ) -> None:
        data = {
            "gif": media_samples.GIF_1X1,
            "tiny": b"\x89PNG",
            "huge": media_samples.png(noise=10 * MB + 1),
            "png": media_samples.png(),
            "untyped": media_samples.png(),
        }[sample]
        content_type = "application/octet-stream" if sample == "untyped" else "image/png"

        with pytest.raises(WeComError) as caught:
            await channel.upload_media(kind, f"x.{sample}", content_type, data)
        assert caught.value.errcode == errcode

    async def test_an_amr_voice_can_be_uploaded(self, kf: KfHarness, channel: KfChannel) -> None:
        voice = media_samples.synthetic_amr(1.0)

        media_id = await channel.upload_media("voice", "voice.amr", "audio/amr", voice)

        assert kf.world.media[media_id].data == voice

    async def test_sending_a_media_id_that_was_not_uploaded_is_40007(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        kf.customer_says(ALICE, "hi")
        _, customer_media = kf.world.add_customer_media(
            KF, ALICE.external_userid, "image", media_samples.png(), "image/png"
        )

        for media_id in ("no-such-media", customer_media):
            with pytest.raises(WeComError) as caught:
                await channel.send_image(ALICE, media_id, msgid=f"x{len(media_id)}")
            assert caught.value.errcode == 40007

    async def test_an_image_into_a_human_session_is_refused(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.customer_says(ALICE, "hi")
        media_id = await channel.upload_media("image", "a.png", "image/png", media_samples.png())
        kf.world.set_service_state(ALICE, 3, "zhangsan")

        with pytest.raises(WeComError) as caught:
            await channel.send_image(ALICE, media_id, msgid="i0")
        assert caught.value.errcode == WeComError.SESSION_NOT_SENDABLE


class TestLostAnswers:
    """`world.lose_response_next`: the call takes effect but its answer never arrives (a timeout, a cut
    connection). A resend of the same msgid is then refused as a repeat, which the reply session reads as
    "it did land" (application/reply_session.py; the errcode is NOT VERIFIED, docs/wecom-kf.md §6.2)."""

    async def test_a_text_whose_answer_is_lost_was_delivered(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.customer_says(ALICE, "hi")
        kf.world.lose_response_next(SEND_MSG)

        with pytest.raises(WeComError) as lost:
            await channel.send_text(ALICE, "您好", msgid="lost_0")
        assert lost.value.errcode is None and lost.value.is_transient
        assert [(s.text, s.msgid) for s in kf.world.sent] == [("您好", "lost_0")]

        with pytest.raises(WeComError) as repeat:
            await channel.send_text(ALICE, "您好", msgid="lost_0")
        assert refuses_repeated_msgid(repeat.value)
        assert [s.text for s in kf.world.sent] == ["您好"]

    async def test_only_the_next_answer_is_lost(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.customer_says(ALICE, "hi")
        kf.world.lose_response_next(SEND_MSG)

        with pytest.raises(WeComError):
            await channel.send_text(ALICE, "一", msgid="part_0")
        assert await channel.send_text(ALICE, "二", msgid="part_1") == "part_1"
        assert [s.text for s in kf.world.sent] == ["一", "二"]

    async def test_an_event_message_whose_answer_is_lost_was_delivered(
        self, kf: KfHarness, channel: KfChannel
    ) -> None:
        _, code = kf.world.add_enter_session(KF, ALICE.external_userid)
        kf.world.lose_response_next(SEND_MSG_ON_EVENT)

        with pytest.raises(WeComError) as lost:
            await channel.send_on_event(code, "欢迎光临", msgid="welcome_1")
        assert lost.value.errcode is None
        assert [s.text for s in kf.world.sent_on_event] == ["欢迎光临"]

    async def test_a_failed_call_loses_nothing(self, kf: KfHarness, channel: KfChannel) -> None:
        kf.world.lose_response_next(SEND_MSG)

        with pytest.raises(WeComError) as refused:  # no customer message: outside the 48 h window
            await channel.send_text(ALICE, "您好", msgid="early_0")
        assert refused.value.errcode not in (None, 0)
        kf.customer_says(ALICE, "hi")
        with pytest.raises(WeComError) as lost:
            await channel.send_text(ALICE, "您好", msgid="later_0")
        assert lost.value.errcode is None
