"""Images, files and voice from customers, and files in answers: the use cases over fake adapters."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import pytest
from dependency_injector import providers

import bootstrap
from adapters.outbound.audio import FakeAudioConverter
from adapters.outbound.fake_dify import DEFAULT_TRANSCRIPT, FakeChatEngine, FakeReply
from adapters.outbound.fake_wecom import KfWorld
from application.drain_customer import PAIRING_GRACE_S, PAIRING_POLL_S
from application.errors import AudioConversionError, ChatEngineError
from application.options import ReplyTexts
from application.ports import MessageState
from domain.chat import AnswerFile, AppParameters, Question
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import CustomerRef, InboundMessage
from tests.support import media_samples
from tests.support.containers import FakeAdapters, FakeClock, fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkUnit"
WM = "wmMedia"
CUSTOMER = CustomerRef(KF, WM)
TEXTS = ReplyTexts()
MB = 1024 * 1024

LEGACY_IMAGES = {
    "image": {"enabled": True, "number_limits": 3, "transfer_methods": ["remote_url", "local_file"]}
}
IMAGES_AND_DOCUMENTS = {
    "enabled": True,
    "allowed_file_types": ["image", "document"],
    "allowed_file_upload_methods": ["local_file", "remote_url"],
    "number_limits": 3,
}


class MediaApp:
    def __init__(
        self,
        *,
        file_upload: Mapping[str, Any] = IMAGES_AND_DOCUMENTS,
        speech_to_text: bool = True,
        window: float = 0.3,
        converter: FakeAudioConverter | None = None,
        **parameters: Any,
    ) -> None:
        self.engine = FakeChatEngine(
            app_parameters=AppParameters(
                file_upload=dict(file_upload), speech_to_text=speech_to_text, **parameters
            )
        )
        self.converter = converter or FakeAudioConverter()

        def customize(adapters: FakeAdapters) -> None:
            adapters.engine.override(providers.Object(self.engine))
            adapters.audio.override(providers.Object(self.converter))

        self.app = fake_application(
            unit_settings(image_text_window_s=window, interim_after_s=0.0), customize=customize
        )
        self.world: KfWorld = self.app.adapters.world()
        self.inbox_reads = 0
        store = self.app.adapters.store()
        read_inbox = store.pending

        async def counted(customer: CustomerRef) -> list[InboundMessage]:
            self.inbox_reads += 1
            pending: list[InboundMessage] = await read_inbox(customer)
            return pending

        store.pending = counted

    @property
    def clock(self) -> FakeClock:
        clock: FakeClock = self.app.adapters.clock()
        return clock

    async def run(self) -> None:
        self.app.dispatcher().notify(KF, "tok")
        await asyncio.wait_for(self.app.dispatcher().idle(), 20)

    def texts(self) -> list[str]:
        return [s.text for s in self.world.sent if s.customer == CUSTOMER]

    def image(self, data: bytes | None = None, content_type: str = "image/png") -> tuple[str, str]:
        return self.world.add_customer_media(KF, WM, "image", data or media_samples.png(), content_type)

    def file(self, data: bytes, content_type: str, filename: str) -> tuple[str, str]:
        return self.world.add_customer_media(KF, WM, "file", data, content_type, filename=filename)

    def voice(self, data: bytes | None = None) -> tuple[str, str]:
        return self.world.add_customer_media(
            KF, WM, "voice", data or media_samples.synthetic_amr(), "audio/amr"
        )

    def only_upload(self) -> tuple[str, bytes]:
        (upload_id,) = self.engine.uploads
        uploaded, user, data = self.engine.uploads[upload_id]
        return uploaded.name, data


# --- images ----------------------------------------------------------------------------------------------


async def test_an_image_is_uploaded_for_the_customer_and_asked_about() -> None:
    m = MediaApp()
    image = media_samples.png()
    m.image(image)

    await m.run()

    (question,) = m.engine.questions
    (attachment,) = question.files
    uploaded, user, data = m.engine.uploads[attachment.upload_file_id]
    assert (attachment.kind, user, data) == ("image", CUSTOMER.dify_user(), image)
    assert uploaded.name.endswith(".png") and uploaded.mime_type == "image/png"
    assert question.query == TEXTS.image_query
    assert m.texts() == [f"答：{TEXTS.image_query}"]


async def test_the_legacy_image_setting_also_enables_images() -> None:
    m = MediaApp(file_upload=LEGACY_IMAGES)
    m.image()

    await m.run()

    assert [q.files[0].kind for q in m.engine.questions] == ["image"]


async def test_the_bytes_decide_the_image_type_not_the_header() -> None:
    m = MediaApp()
    m.image(media_samples.png(), content_type="application/octet-stream")

    await m.run()

    name, _ = m.only_upload()
    assert name.endswith(".png")


async def test_without_image_upload_the_customer_gets_the_unsupported_text_at_once() -> None:
    without_window = MediaApp(file_upload={}, window=0.0)
    without_window.image()
    await without_window.run()

    m = MediaApp(file_upload={}, window=3600.0)
    m.image()
    await m.run()  # the image is not held for the hour the window allows

    assert m.texts() == without_window.texts() == [TEXTS.unsupported]
    assert m.engine.uploads == {} and m.engine.questions == []
    # No waiting for a text when images cannot be asked about: the inbox is not polled for one, it is read
    # exactly as often as when there is no pairing window at all.
    assert m.inbox_reads == without_window.inbox_reads


async def test_an_expired_image_is_told_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    m = MediaApp()
    m.world.add_customer_message(KF, WM, "image", {"media_id": "gone-after-three-days"})

    with caplog.at_level(logging.WARNING, logger="kfdify.media"):
        await m.run()

    assert m.texts() == [TEXTS.media_expired]
    assert any("errcode=40007" in r.getMessage() for r in caplog.records)


async def test_an_image_over_wecoms_cap_is_too_large() -> None:
    m = MediaApp()
    m.image(media_samples.png(noise=2 * MB + 10))

    await m.run()

    assert m.texts() == [TEXTS.too_large.replace("{limit}", "2")]
    assert m.engine.uploads == {}


async def test_an_image_over_difys_smaller_limit_is_too_large() -> None:
    m = MediaApp(image_file_size_limit_mb=1)
    m.image(media_samples.png(noise=MB + 10))

    await m.run()

    assert m.texts() == [TEXTS.too_large.replace("{limit}", "1")]


async def test_a_failed_upload_is_told_and_nothing_is_asked(caplog: pytest.LogCaptureFixture) -> None:
    m = MediaApp()
    m.engine.fail_next_media("upload_file", ChatEngineError("internal_server_error", "boom", status=500))
    m.image()

    with caplog.at_level(logging.WARNING, logger="kfdify.media"):
        await m.run()

    assert m.texts() == [TEXTS.media_failed]
    assert m.engine.questions == []
    assert any("status=500" in r.getMessage() for r in caplog.records)


async def test_a_download_failure_is_told() -> None:
    m = MediaApp()
    m.image()
    m.world.fail_next("media/get", -1)

    await m.run()

    assert m.texts() == [TEXTS.media_failed]


async def test_parameters_that_cannot_be_read_are_told_as_a_media_failure() -> None:
    m = MediaApp()

    async def broken() -> AppParameters:
        raise ChatEngineError("unreachable", "down", retryable=True)

    m.engine.parameters = broken  # type: ignore[method-assign]
    m.image()

    await m.run()

    assert m.texts() == [TEXTS.media_failed]


# --- image + text ----------------------------------------------------------------------------------------


async def test_an_image_and_the_text_after_it_are_one_question() -> None:
    m = MediaApp(window=3.0)
    image_msgid, _ = m.image()
    text_msgid = m.world.add_customer_text(KF, WM, "这个零件叫什么？")

    await m.run()

    (question,) = m.engine.questions
    assert question.query == "这个零件叫什么？"
    assert [f.kind for f in question.files] == ["image"]
    assert m.texts() == ["答：这个零件叫什么？"]
    # Named after the text: its quota is the fresh one.
    assert m.world.sent[0].msgid == outbound_msgid(DedupeKey(KF, text_msgid), 0)
    store = m.app.adapters.store()
    for msgid in (image_msgid, text_msgid):
        assert await store.state(DedupeKey(KF, msgid)) is MessageState.DONE
    assert await store.pending(CUSTOMER) == []


async def test_a_text_that_arrives_while_the_image_waits_joins_it() -> None:
    m = MediaApp(window=2.0)
    m.image()
    m.app.dispatcher().notify(KF, "tok")
    await asyncio.sleep(0.5)  # the image is pulled and waits
    m.world.add_customer_text(KF, WM, "图里是什么？")
    m.app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(m.app.dispatcher().idle(), 20)

    (question,) = m.engine.questions
    assert (question.query, len(question.files)) == ("图里是什么？", 1)


async def test_an_image_alone_is_asked_once_the_window_passes() -> None:
    without_window = MediaApp(window=0.0)
    without_window.image()
    await without_window.run()

    window = 0.3
    m = MediaApp(window=window)
    sent = int(m.clock.now())
    m.clock.value = sent  # pulled the moment it was sent: the whole window is still ahead
    m.world.add_customer_media(KF, WM, "image", media_samples.png(), "image/png", send_time=sent)
    await m.run()

    assert [q.query for q in m.engine.questions] == [TEXTS.image_query]
    # The image waited, polling the inbox for a text, and gave up after the window plus as much grace: each
    # poll sleeps `PAIRING_POLL_S` (or what is left), so there are at most this many (however slow the loop).
    polls = m.inbox_reads - without_window.inbox_reads
    assert 2 <= polls <= math.ceil((window + min(PAIRING_GRACE_S, window)) / PAIRING_POLL_S) + 2, polls


async def test_the_window_counts_from_the_send_time_not_from_the_pull() -> None:
    without_window = MediaApp(window=0.0)
    without_window.image()
    await without_window.run()

    window = 5.0
    m = MediaApp(window=window)
    sent = int(m.clock.now())
    m.world.add_customer_media(KF, WM, "image", media_samples.png(), "image/png", send_time=sent)
    m.clock.advance(window + min(PAIRING_GRACE_S, window))  # pulled only once the window and grace are over

    await m.run()

    assert [q.query for q in m.engine.questions] == [TEXTS.image_query]
    assert m.inbox_reads == without_window.inbox_reads + 1  # one look for a text, no wait for one


async def test_a_text_sent_long_after_the_image_is_its_own_question() -> None:
    m = MediaApp(window=1.0)
    now = int(time.time())
    m.world.add_customer_media(KF, WM, "image", media_samples.png(), "image/png", send_time=now - 10)
    m.world.add_customer_text(KF, WM, "另一个问题", send_time=now)

    await m.run()

    assert [(q.query, len(q.files)) for q in m.engine.questions] == [
        (TEXTS.image_query, 1),
        ("另一个问题", 0),
    ]


async def test_a_reset_after_an_image_is_a_command_not_a_question() -> None:
    m = MediaApp(window=3.0)
    m.image()
    m.world.add_customer_text(KF, WM, "重置")

    await m.run()

    assert [q.query for q in m.engine.questions] == [TEXTS.image_query]
    assert m.texts() == [f"答：{TEXTS.image_query}", TEXTS.reset_done]


async def test_when_the_image_fails_the_text_is_still_answered() -> None:
    m = MediaApp(window=3.0)
    m.world.add_customer_message(KF, WM, "image", {"media_id": "expired-media"})
    m.world.add_customer_text(KF, WM, "收到了吗？")

    await m.run()

    (question,) = m.engine.questions
    assert (question.query, question.files) == ("收到了吗？", ())
    assert m.texts() == [TEXTS.media_expired, "答：收到了吗？"]


# --- files -----------------------------------------------------------------------------------------------


async def test_a_pdf_is_uploaded_as_a_document_with_its_name() -> None:
    m = MediaApp()
    document = media_samples.pdf()
    m.file(document, "application/pdf", "保修条款.pdf")

    await m.run()

    (question,) = m.engine.questions
    assert question.query == TEXTS.file_query
    assert [f.kind for f in question.files] == ["document"]
    assert m.only_upload() == ("保修条款.pdf", document)


async def test_a_file_without_a_name_gets_one_from_its_type() -> None:
    m = MediaApp()
    _, media_id = m.file(media_samples.pdf(), "application/pdf", "")

    await m.run()

    name, _ = m.only_upload()
    assert name == f"{media_id}.pdf"


async def test_a_file_type_the_app_does_not_take_names_what_it_takes() -> None:
    m = MediaApp()
    m.file(b"PK\x03\x04" + b"\0" * 100, "application/zip", "资料.zip")

    await m.run()

    (reply,) = m.texts()
    assert reply.startswith("抱歉，暂时无法处理这种文件。")
    assert "PDF" in reply and "DOCX" in reply and "图片" in reply
    assert m.engine.uploads == {}


async def test_custom_extensions_are_taken_as_custom_files() -> None:
    m = MediaApp(
        file_upload={"enabled": True, "allowed_file_types": ["custom"], "allowed_file_extensions": [".zip"]}
    )
    m.file(b"PK\x03\x04" + b"\0" * 100, "application/zip", "资料.zip")

    await m.run()

    assert [f.kind for f in m.engine.questions[0].files] == ["custom"]


async def test_files_when_the_app_takes_no_files_get_the_unsupported_text() -> None:
    m = MediaApp(file_upload={})
    m.file(media_samples.pdf(), "application/pdf", "a.pdf")

    await m.run()

    assert m.texts() == [TEXTS.unsupported]


async def test_a_document_over_difys_file_limit_is_too_large() -> None:
    m = MediaApp(file_size_limit_mb=1)
    m.file(media_samples.pdf() + b"%" * MB, "application/pdf", "big.pdf")

    await m.run()

    assert m.texts() == [TEXTS.too_large.replace("{limit}", "1")]


# --- voice -----------------------------------------------------------------------------------------------


async def test_voice_is_converted_transcribed_and_answered_as_typed() -> None:
    m = MediaApp()
    voice = media_samples.synthetic_amr()
    m.voice(voice)

    await m.run()

    assert [c.data for c in m.converter.converted] == [voice]
    ((user, content_type, audio),) = m.engine.transcriptions
    assert (user, content_type, audio[:4]) == (CUSTOMER.dify_user(), "audio/wav", b"RIFF")
    assert [q.query for q in m.engine.questions] == [DEFAULT_TRANSCRIPT]
    assert m.texts() == [f"答：{DEFAULT_TRANSCRIPT}"]


async def test_a_spoken_reset_resets() -> None:
    m = MediaApp()
    m.engine.transcript = "重置"
    m.voice()

    await m.run()

    assert m.engine.questions == []
    assert m.texts() == [TEXTS.reset_done]


@pytest.mark.parametrize(
    ("speech_to_text", "converter"),
    [(False, FakeAudioConverter()), (True, FakeAudioConverter(available=False))],
    ids=["speech to text off", "no ffmpeg"],
)
async def test_voice_without_speech_to_text_or_converter_gets_the_unsupported_text(
    speech_to_text: bool, converter: FakeAudioConverter
) -> None:
    m = MediaApp(speech_to_text=speech_to_text, converter=converter)
    m.voice()

    await m.run()

    assert m.texts() == [TEXTS.unsupported]
    assert m.engine.transcriptions == []


async def test_a_failed_conversion_is_told(caplog: pytest.LogCaptureFixture) -> None:
    m = MediaApp()
    m.converter.fail_with = AudioConversionError("ffmpeg exited with 1: Invalid data")
    m.voice()

    with caplog.at_level(logging.WARNING, logger="kfdify.media"):
        await m.run()

    assert m.texts() == [TEXTS.voice_failed]
    assert any("Invalid data" in r.getMessage() for r in caplog.records)


async def test_a_failed_transcription_is_told() -> None:
    m = MediaApp()
    m.engine.fail_next_media(
        "transcribe", ChatEngineError("completion_request_error", "model down", status=400)
    )
    m.voice()

    await m.run()

    assert m.texts() == [TEXTS.voice_failed]
    assert m.engine.questions == []


async def test_an_empty_transcript_is_told() -> None:
    m = MediaApp()
    m.engine.transcript = "  "
    m.voice()

    await m.run()

    assert m.texts() == [TEXTS.voice_failed]


async def test_configured_texts_replace_the_defaults() -> None:
    engine = FakeChatEngine(app_parameters=AppParameters(file_upload={}))
    settings = unit_settings(texts={"unsupported": "只收文字", "voice_failed": "没听清"})
    app = fake_application(
        settings, customize=lambda adapters: adapters.engine.override(providers.Object(engine))
    )
    world = app.adapters.world()
    world.add_customer_media(KF, WM, "image", media_samples.png(), "image/png")

    app.dispatcher().notify(KF, "t")
    await asyncio.wait_for(app.dispatcher().idle(), 10)

    assert [s.text for s in world.sent] == ["只收文字"]
    assert bootstrap.build_texts({"voice_failed": "没听清"}).voice_failed == "没听清"


# --- files in answers ------------------------------------------------------------------------------------


def answering_with(*files: AnswerFile, text: str = "这是示意图。") -> Any:
    def responder(question: Question, history: Any) -> FakeReply:
        return FakeReply(text, files=files)

    return responder


async def test_an_answer_image_is_sent_as_an_image_after_the_text() -> None:
    m = MediaApp()
    image = media_samples.png()
    url = m.engine.host_file("https://dify.fake/files/tools/a.png?sign=s", image, "image/png")
    m.engine.responder = answering_with(AnswerFile("image", url))
    msgid = m.world.add_customer_text(KF, WM, "给我看看")

    await m.run()

    assert m.texts() == ["这是示意图。"]
    (sent,) = m.world.sent_media
    assert (sent.msgtype, sent.msgid) == ("image", outbound_msgid(DedupeKey(KF, msgid), 1))
    stored = m.world.media[sent.media_id]
    assert (stored.data, stored.filename) == (image, "a.png")


async def test_other_answer_files_and_unsendable_images_become_links() -> None:
    m = MediaApp()
    gif = m.engine.host_file("https://dify.fake/files/tools/b.gif?sign=s", media_samples.GIF_1X1, "image/gif")
    pdf = "https://dify.fake/files/tools/c.pdf?sign=s"
    missing = "https://dify.fake/files/tools/gone.png?sign=s"
    m.engine.responder = answering_with(
        AnswerFile("image", gif), AnswerFile("document", pdf), AnswerFile("image", missing)
    )
    m.world.add_customer_text(KF, WM, "资料")

    await m.run()

    assert m.world.sent_media == []
    assert m.texts() == ["这是示意图。", "\n".join([TEXTS.answer_files, pdf, gif, missing])]


async def test_answer_images_stay_within_the_five_message_quota() -> None:
    m = MediaApp()
    urls = [
        m.engine.host_file(
            f"https://dify.fake/files/tools/{i}.png?sign=s", media_samples.png(rgb=(i, i, i)), "image/png"
        )
        for i in range(6)
    ]
    m.engine.responder = answering_with(*(AnswerFile("image", u) for u in urls), text="很长的回答。" * 1000)
    m.world.add_customer_text(KF, WM, "全部图片")

    await m.run()

    texts = m.texts()
    assert len(texts) + len(m.world.sent_media) == 5
    assert len(m.world.sent_media) == 3
    assert texts[-1].startswith(TEXTS.answer_files) and urls[-1] in texts[-1]


async def test_a_bug_while_preparing_media_is_still_told(caplog: pytest.LogCaptureFixture) -> None:
    m = MediaApp()

    async def broken(audio: Any) -> Any:
        raise RuntimeError("bug")

    m.converter.to_speech = broken  # type: ignore[method-assign]
    m.voice()

    with caplog.at_level(logging.ERROR, logger="kfdify.media"):
        await m.run()

    assert m.texts() == [TEXTS.voice_failed]
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)
