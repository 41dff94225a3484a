"""Images, files and voice through the whole service: a signed callback in, real adapters over HTTP to fake
WeCom and Dify servers (which check part names, content types and sizes), replies out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from application.options import ReplyTexts
from tests.support import media_samples
from tests.support.dify_server import DEFAULT_TRANSCRIPT, Fault
from tests.support.stack import KF, Servers, Stack, fake_servers, make_settings, running

pytestmark = pytest.mark.anyio
TEXTS = ReplyTexts()
MB = 1024 * 1024

IMAGES_AND_DOCUMENTS = {
    "enabled": True,
    "allowed_file_types": ["image", "document"],
    "allowed_file_upload_methods": ["local_file", "remote_url"],
    "number_limits": 3,
    "image": {"enabled": True, "number_limits": 3, "transfer_methods": ["local_file", "remote_url"]},
}


@pytest.fixture
def servers() -> Iterator[Servers]:
    with fake_servers(file_upload=IMAGES_AND_DOCUMENTS, speech_to_text=True) as s:
        yield s


async def start(servers: Servers, **overrides: Any) -> AsyncIterator[Stack]:
    settings = make_settings(servers, **({"image_text_window_s": 0.5, "interim_after_s": 0.0} | overrides))
    async with running(settings, servers) as stack:
        yield stack


@pytest.fixture
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    async for s in start(servers):
        yield s


async def deliver(stack: Stack) -> None:
    assert (await stack.callback()).status_code == 200
    await stack.settle(30)


def uploads(stack: Stack) -> list[Any]:
    return list(stack.dify.uploads.values())


# --- images ----------------------------------------------------------------------------------------------


async def test_an_image_reaches_dify_as_an_uploaded_file_of_the_same_user(stack: Stack) -> None:
    image = media_samples.png()
    stack.wecom.world.add_customer_media(KF, "wmImg", "image", image, "image/png")

    await deliver(stack)

    (upload,) = uploads(stack)
    (chat,) = stack.dify.chat_requests()
    assert upload.data == image
    assert upload.name.endswith(".png") and upload.mime_type == "image/png"
    assert upload.user == chat.json["user"] and chat.json["user"].endswith("wmImg")
    assert chat.json["query"] == TEXTS.image_query
    assert chat.json["files"] == [
        {"type": "image", "transfer_method": "local_file", "upload_file_id": upload.id}
    ]
    assert stack.replies_to("wmImg") == [f"答：{TEXTS.image_query}"]


async def test_a_jpeg_keeps_its_type(stack: Stack) -> None:
    image = media_samples.jpeg()
    if image is None:
        pytest.skip("no ffmpeg to make a JPEG")
    stack.wecom.world.add_customer_media(KF, "wmJpg", "image", image, "image/jpeg")

    await deliver(stack)

    (upload,) = uploads(stack)
    assert (upload.extension, upload.mime_type, upload.data) == ("jpg", "image/jpeg", image)


async def test_an_image_and_the_question_after_it_are_asked_together(stack: Stack) -> None:
    stack.wecom.world.add_customer_media(KF, "wmPair", "image", media_samples.png(), "image/png")
    stack.wecom.world.add_customer_text(KF, "wmPair", "这个报错是什么意思？")

    await deliver(stack)

    (chat,) = stack.dify.chat_requests()
    (upload,) = uploads(stack)
    assert chat.json["query"] == "这个报错是什么意思？"
    assert [f["upload_file_id"] for f in chat.json["files"]] == [upload.id]
    assert stack.replies_to("wmPair") == ["答：这个报错是什么意思？"]


async def test_without_image_upload_in_the_app_the_customer_is_told(servers: Servers) -> None:
    servers.dify.file_upload = {}
    async for stack in start(servers, image_text_window_s=5.0):
        stack.wecom.world.add_customer_media(KF, "wmOff", "image", media_samples.png(), "image/png")

        await deliver(stack)

        assert stack.replies_to("wmOff") == [TEXTS.unsupported]
        assert stack.dify.uploads == {} and stack.dify.chat_requests() == []
        assert stack.wecom.calls_to("media/get") == []


async def test_expired_media_is_told(stack: Stack) -> None:
    stack.wecom.world.add_customer_message(KF, "wmOld", "image", {"media_id": "expired_media_id"})

    await deliver(stack)

    assert stack.replies_to("wmOld") == [TEXTS.media_expired]
    assert [c.errcode for c in stack.wecom.calls_to("media/get")] == [40007]


async def test_a_text_plain_errcode_from_media_get_is_understood(stack: Stack) -> None:
    stack.wecom.media_error_content_type = "text/plain"
    stack.wecom.world.add_customer_message(KF, "wmPlain", "image", {"media_id": "expired_media_id"})

    await deliver(stack)

    assert stack.replies_to("wmPlain") == [TEXTS.media_expired]


async def test_an_image_over_difys_limit_is_refused_before_uploading(servers: Servers) -> None:
    servers.dify.system_parameters = {"file_size_limit": 15, "image_file_size_limit": 1}
    async for stack in start(servers):
        stack.wecom.world.add_customer_media(
            KF, "wmBig", "image", media_samples.png(noise=MB + 1000), "image/png"
        )

        await deliver(stack)

        assert stack.replies_to("wmBig") == [TEXTS.too_large.replace("{limit}", "1")]
        assert stack.dify.requests_to("/v1/files/upload") == []


async def test_a_failed_upload_still_answers_the_text_part(stack: Stack) -> None:
    stack.dify.inject(
        Fault(path="/v1/files/upload", status=503, body="<html>503</html>", content_type="text/html")
    )
    stack.wecom.world.add_customer_media(KF, "wmFail", "image", media_samples.png(), "image/png")
    stack.wecom.world.add_customer_text(KF, "wmFail", "看得到吗？")

    await deliver(stack)

    assert stack.replies_to("wmFail") == [TEXTS.media_failed, "答：看得到吗？"]
    (chat,) = stack.dify.chat_requests()
    assert "files" not in chat.json


# --- files -----------------------------------------------------------------------------------------------


async def test_a_pdf_goes_to_dify_as_a_document_named_as_the_customer_named_it(stack: Stack) -> None:
    document = media_samples.pdf("Warranty terms")
    stack.wecom.world.add_customer_media(
        KF, "wmPdf", "file", document, "application/pdf", filename="保修条款 v2.pdf"
    )

    await deliver(stack)

    (upload,) = uploads(stack)
    (chat,) = stack.dify.chat_requests()
    assert (upload.name, upload.mime_type, upload.data) == ("保修条款 v2.pdf", "application/pdf", document)
    assert chat.json["files"] == [
        {"type": "document", "transfer_method": "local_file", "upload_file_id": upload.id}
    ]
    assert chat.json["query"] == TEXTS.file_query


async def test_a_file_type_the_app_refuses_is_answered_with_what_it_takes(stack: Stack) -> None:
    stack.wecom.world.add_customer_media(
        KF, "wmZip", "file", b"PK\x03\x04" + b"\0" * 64, "application/zip", filename="a.zip"
    )

    await deliver(stack)

    (reply,) = stack.replies_to("wmZip")
    assert reply.startswith("抱歉，暂时无法处理这种文件。") and "PDF" in reply
    assert stack.dify.uploads == {}


# --- voice -----------------------------------------------------------------------------------------------


@pytest.fixture
def ffmpeg() -> str:
    return media_samples.ffmpeg_or_fail()


async def test_a_voice_message_is_transcribed_and_answered(stack: Stack, ffmpeg: str) -> None:
    stack.wecom.world.add_customer_media(KF, "wmVoice", "voice", media_samples.amr_clip(), "audio/amr")

    await deliver(stack)

    (speech,) = stack.dify.requests_to("/v1/audio-to-text")
    parts = {p.name: p for p in speech.form}
    assert parts["file"].content_type == "audio/wav"
    assert parts["file"].data[:4] == b"RIFF" and parts["file"].data[8:12] == b"WAVE"
    assert int.from_bytes(parts["file"].data[24:28], "little") == 16000
    assert parts["user"].text.endswith("wmVoice")
    (chat,) = stack.dify.chat_requests()
    assert chat.json["query"] == DEFAULT_TRANSCRIPT
    assert stack.replies_to("wmVoice") == [f"答：{DEFAULT_TRANSCRIPT}"]


async def test_a_spoken_reset_command_resets(stack: Stack, ffmpeg: str) -> None:
    stack.dify.transcribe = lambda audio, content_type: "重新开始"
    stack.wecom.world.add_customer_media(KF, "wmVoiceReset", "voice", media_samples.amr_clip(), "audio/amr")

    await deliver(stack)

    assert stack.replies_to("wmVoiceReset") == [TEXTS.reset_done]
    assert stack.dify.chat_requests() == []


async def test_voice_in_an_app_without_speech_to_text_is_told(servers: Servers, ffmpeg: str) -> None:
    servers.dify.speech_to_text = False
    async for stack in start(servers):
        stack.wecom.world.add_customer_media(KF, "wmNoStt", "voice", media_samples.amr_clip(), "audio/amr")

        await deliver(stack)

        assert stack.replies_to("wmNoStt") == [TEXTS.unsupported]
        assert stack.dify.requests_to("/v1/audio-to-text") == []


async def test_a_failed_transcription_is_told(stack: Stack, ffmpeg: str) -> None:
    stack.dify.inject(
        Fault(path="/v1/audio-to-text", status=400, body={"code": "completion_request_error", "message": "x"})
    )
    stack.wecom.world.add_customer_media(KF, "wmSttFail", "voice", media_samples.amr_clip(), "audio/amr")

    await deliver(stack)

    assert stack.replies_to("wmSttFail") == [TEXTS.voice_failed]


# --- files in answers ------------------------------------------------------------------------------------


async def test_an_image_in_the_answer_is_sent_as_an_image_message(stack: Stack) -> None:
    image = media_samples.png(rgb=(0, 128, 255))
    stack.dify.inject(Fault(files=(("image", stack.dify.host_file(image, "image/png", "png")),)))
    stack.wecom.world.add_customer_text(KF, "wmAnsImg", "画个图")

    await deliver(stack)

    assert stack.replies_to("wmAnsImg") == ["答：画个图"]
    (sent,) = [s for s in stack.wecom.world.sent_media if s.customer.external_userid == "wmAnsImg"]
    assert sent.msgtype == "image"
    assert stack.wecom.world.media[sent.media_id].data == image
    (upload,) = stack.wecom.calls_to("media/upload")
    assert upload.body is not None and upload.body["content_type"] == "image/png"


async def test_a_document_in_the_answer_becomes_a_link(stack: Stack) -> None:
    url = stack.dify.host_file(media_samples.pdf(), "application/pdf", "pdf")
    stack.dify.inject(Fault(files=(("document", url),), files_in_message_end=True))
    stack.wecom.world.add_customer_text(KF, "wmAnsDoc", "发我说明书")

    await deliver(stack)

    text, links = stack.replies_to("wmAnsDoc")
    assert text == "答：发我说明书"
    assert links.startswith(TEXTS.answer_files) and links.endswith(
        stack.servers.dify_url.removesuffix("/v1") + url
    )
    assert stack.wecom.world.sent_media == []
