"""The media parts of the real adapters the contract suite cannot see: wire details, WeCom error bodies,
token refresh, early aborts, and ffmpeg."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from adapters.outbound.audio import FfmpegAudioConverter, find_ffmpeg, silent_wav
from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.wecom_api import WeComKfChannel
from application.errors import AudioConversionError, ChatEngineError, MediaTooLarge, WeComError
from domain.chat import AnswerFile, Question
from domain.media import MediaBlob
from tests.support import media_samples
from tests.support.dify_server import FakeDifyServer, Fault
from tests.support.http_server import serve
from tests.support.wecom_server import FakeWeComServer

pytestmark = pytest.mark.anyio
KF = "wkMEDIA"
KEY = "app-media-key"


@pytest.fixture(scope="module")
def wecom() -> Iterator[tuple[FakeWeComServer, str]]:
    server = FakeWeComServer()
    with serve(server.app) as url:
        yield server, url


@pytest.fixture
async def channel(wecom: tuple[FakeWeComServer, str], anyio_backend: str) -> AsyncIterator[WeComKfChannel]:
    server, url = wecom
    server.reset()
    server.media_error_content_type = "application/json; charset=UTF-8"
    adapter = WeComKfChannel(corp_id=server.corp_id, corp_secret=server.corp_secret, api_base=url, timeout=5)
    yield adapter
    await adapter.aclose()


@pytest.fixture(scope="module")
def dify_url() -> Iterator[tuple[FakeDifyServer, str]]:
    server = FakeDifyServer(api_key=KEY, ping_interval=0.05, speech_to_text=True)
    with serve(server.app) as url:
        yield server, url


@pytest.fixture
async def engine(dify_url: tuple[FakeDifyServer, str], anyio_backend: str) -> AsyncIterator[DifyChatEngine]:
    server, url = dify_url
    server.requests.clear()
    server.faults.clear()
    adapter = DifyChatEngine(
        base_url=f"{url}/v1", api_key=KEY, read_timeout=5, idle_timeout=5, total_timeout=10
    )
    yield adapter
    await adapter.aclose()


# --- WeCom ----------------------------------------------------------------------------------------------


class TestWeComMedia:
    async def test_an_errcode_sent_as_text_plain_is_still_an_error(
        self, wecom: tuple[FakeWeComServer, str], channel: WeComKfChannel
    ) -> None:
        server, _ = wecom
        server.media_error_content_type = "text/plain"

        with pytest.raises(WeComError) as caught:
            await channel.download_media("unknown", max_bytes=1024)
        assert caught.value.errcode == 40007

    async def test_a_customers_json_or_text_file_is_not_mistaken_for_an_error(
        self, wecom: tuple[FakeWeComServer, str], channel: WeComKfChannel
    ) -> None:
        server, _ = wecom
        for data, content_type in (
            (b'{"errcode": 0}', "application/json"),
            (b"errcode: 40007", "text/plain"),
        ):
            media_id = server.world.add_media(data, content_type, filename="notes.txt")

            blob = await channel.download_media(media_id, max_bytes=1024)

            assert blob.data == data

    async def test_a_revoked_token_is_refreshed_once_for_media_get(
        self, wecom: tuple[FakeWeComServer, str], channel: WeComKfChannel
    ) -> None:
        server, _ = wecom
        media_id = server.world.add_media(media_samples.png(), "image/png", kind="image")
        await channel.download_media(media_id, max_bytes=1024 * 1024)
        server.revoke_tokens(42001)

        blob = await channel.download_media(media_id, max_bytes=1024 * 1024)

        assert blob.data == media_samples.png()
        assert server.gettoken_calls == 2
        assert [c.errcode for c in server.calls_to("media/get")] == [0, 42001, 0]

    async def test_a_revoked_token_is_refreshed_once_for_media_upload(
        self, wecom: tuple[FakeWeComServer, str], channel: WeComKfChannel
    ) -> None:
        server, _ = wecom
        await channel.check_access()
        server.revoke_tokens(40014)

        media_id = await channel.upload_media("image", "a.png", "image/png", media_samples.png())

        assert server.world.media[media_id].data == media_samples.png()

    async def test_the_upload_part_is_named_media_and_typed(
        self, wecom: tuple[FakeWeComServer, str], channel: WeComKfChannel
    ) -> None:
        server, _ = wecom

        await channel.upload_media("image", "答案.png", "image/png", media_samples.png())

        (call,) = server.calls_to("media/upload")
        assert call.body == {
            "type": "image",
            "filename": "答案.png",
            "content_type": "image/png",
            "size": len(media_samples.png()),
        }

    async def test_a_declared_length_over_the_cap_stops_before_the_body(
        self, wecom: tuple[FakeWeComServer, str], channel: WeComKfChannel
    ) -> None:
        server, _ = wecom
        media_id = server.world.add_media(b"\0" * 50_000, "application/octet-stream")

        with pytest.raises(MediaTooLarge) as caught:
            await channel.download_media(media_id, max_bytes=1000)
        assert (caught.value.limit_bytes, caught.value.size) == (1000, 50_000)

    async def test_an_undeclared_body_is_cut_as_soon_as_it_passes_the_cap(self) -> None:
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(1000):
                sent += 1
                yield b"\0" * 1024

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("gettoken"):
                return httpx.Response(200, json={"errcode": 0, "access_token": "t", "expires_in": 7200})
            return httpx.Response(200, headers={"Content-Type": "image/png"}, content=endless())

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        adapter = WeComKfChannel(corp_id="ww", corp_secret="s", api_base="http://wecom.test", client=client)
        async with client:
            with pytest.raises(MediaTooLarge):
                await adapter.download_media("m", max_bytes=10 * 1024)
        assert sent <= 12

    async def test_transport_failures_never_carry_the_token(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("gettoken"):
                return httpx.Response(
                    200, json={"errcode": 0, "access_token": "SECRET-TOKEN", "expires_in": 7200}
                )
            raise httpx.ConnectError(f"cannot reach {request.url}")

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        adapter = WeComKfChannel(corp_id="ww", corp_secret="s", api_base="http://wecom.test", client=client)
        async with client:
            with pytest.raises(WeComError) as caught:
                await adapter.download_media("m", max_bytes=1024)
        assert caught.value.errcode is None
        assert "SECRET-TOKEN" not in str(caught.value) and caught.value.__cause__ is None


# --- Dify -----------------------------------------------------------------------------------------------


class TestDifyMedia:
    async def test_an_upload_sends_one_typed_file_part_and_the_user(
        self, dify_url: tuple[FakeDifyServer, str], engine: DifyChatEngine
    ) -> None:
        server, _ = dify_url

        await engine.upload_file("kf-wk-wm1", "图.png", "image/png", media_samples.png())

        (request,) = server.requests_to("/v1/files/upload")
        parts = {p.name: p for p in request.form}
        assert set(parts) == {"file", "user"}
        assert (parts["file"].filename, parts["file"].content_type) == ("图.png", "image/png")
        assert parts["file"].data == media_samples.png()
        assert parts["user"].text == "kf-wk-wm1" and parts["user"].filename is None
        assert request.headers["authorization"] == f"Bearer {KEY}"

    async def test_speech_goes_out_with_the_explicit_part_type(
        self, dify_url: tuple[FakeDifyServer, str], engine: DifyChatEngine
    ) -> None:
        server, _ = dify_url

        await engine.transcribe("kf-wk-wm1", silent_wav(0.2), "audio/wav")

        (request,) = server.requests_to("/v1/audio-to-text")
        (audio,) = [p for p in request.form if p.name == "file"]
        assert (audio.content_type, audio.filename) == ("audio/wav", "voice.wav")

    async def test_answer_files_in_message_end_are_read_once(
        self, dify_url: tuple[FakeDifyServer, str], engine: DifyChatEngine
    ) -> None:
        server, url = dify_url
        server.inject(Fault(files=(("image", "/files/tools/x.png?sign=1"),), files_in_message_end=True))

        answer = await engine.ask(Question(user="wm-a", query="图"))

        assert answer.files == (AnswerFile("image", f"{url}/files/tools/x.png?sign=1"),)

    async def test_fetching_an_answer_file_never_sends_the_app_key(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, headers={"Content-Type": "image/png"}, content=media_samples.png())

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        adapter = DifyChatEngine(
            base_url="http://dify.test/v1",
            api_key=KEY,
            client=client,
            file_client=client,
            file_hosts=("cdn.example",),
        )
        async with client:
            blob = await adapter.fetch_file("https://cdn.example/a.png?sig=1", max_bytes=1024 * 1024)

        assert blob == MediaBlob(media_samples.png(), "image/png", "a.png")
        assert "authorization" not in seen[0].headers

    async def test_a_413_page_from_a_proxy_is_an_http_413(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(413, text="<html>413 Request Entity Too Large</html>")

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        adapter = DifyChatEngine(base_url="http://dify.test/v1", api_key=KEY, client=client)
        async with client:
            with pytest.raises(ChatEngineError) as caught:
                await adapter.upload_file("u", "a.pdf", "application/pdf", b"%PDF-1.4")
        assert (caught.value.code, caught.value.status) == ("http_413", 413)


# --- ffmpeg ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ffmpeg() -> str:
    return media_samples.ffmpeg_or_fail()


class TestFfmpegAudioConverter:
    @pytest.mark.parametrize(
        ("output_format", "content_type", "magic"),
        [("wav", "audio/wav", b"RIFF"), ("mp3", "audio/mp3", b"ID3")],
    )
    async def test_amr_becomes_16_khz_mono_speech_audio(
        self, ffmpeg: str, output_format: str, content_type: str, magic: bytes
    ) -> None:
        converter = FfmpegAudioConverter(executable=ffmpeg, output_format=output_format)

        speech = await converter.to_speech(MediaBlob(media_samples.amr_clip(), "audio/amr"))

        assert speech.content_type == content_type
        assert speech.data.startswith(magic)
        if output_format == "wav":
            channels, rate = (
                int.from_bytes(speech.data[22:24], "little"),
                int.from_bytes(speech.data[24:28], "little"),
            )
            assert (channels, rate) == (1, 16000)
            assert len(speech.data) > 16000  # about a second of 16-bit audio

    async def test_the_synthetic_amr_clip_converts_too(self, ffmpeg: str) -> None:
        converter = FfmpegAudioConverter(executable=ffmpeg)

        speech = await converter.to_speech(MediaBlob(media_samples.synthetic_amr(1.0), "audio/amr"))

        assert speech.data.startswith(b"RIFF")

    async def test_garbage_is_a_conversion_error(self, ffmpeg: str) -> None:
        converter = FfmpegAudioConverter(executable=ffmpeg)

        with pytest.raises(AudioConversionError, match="not AMR"):
            await converter.to_speech(MediaBlob(b"not audio at all" * 10, "audio/amr"))

    async def test_garbage_behind_the_amr_magic_is_a_conversion_error(self, ffmpeg: str) -> None:
        converter = FfmpegAudioConverter(executable=ffmpeg)

        with pytest.raises(AudioConversionError, match="ffmpeg exited"):
            await converter.to_speech(MediaBlob(b"#!AMR\n" + b"not audio at all" * 10, "audio/amr"))

    @pytest.mark.parametrize(
        "data",
        [media_samples.png(), silent_wav(0.5), b"ID3\x04" + bytes(64), b"", b"#!AMR-WB\n" + bytes(64)],
        ids=["png", "wav", "mp3", "empty", "amr-wb"],
    )
    async def test_only_amr_is_taken(self, tmp_path: Path, data: bytes) -> None:
        ran = tmp_path / "ran"
        fake = tmp_path / "ffmpeg"
        fake.write_text(f"#!/bin/sh\ntouch {ran}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        converter = FfmpegAudioConverter(executable=str(fake))

        with pytest.raises(AudioConversionError, match="not AMR"):
            await converter.to_speech(MediaBlob(data, "audio/amr"))
        assert not ran.exists()

    async def test_a_long_clip_is_cut_to_the_duration_limit(self, ffmpeg: str) -> None:
        converter = FfmpegAudioConverter(executable=ffmpeg, max_seconds=1)

        speech = await converter.to_speech(MediaBlob(media_samples.synthetic_amr(3.0), "audio/amr"))

        # 16 kHz mono 16-bit: 32000 bytes a second, plus the header.
        assert 30000 < len(speech.data) < 34000

    async def test_a_hanging_ffmpeg_is_killed_after_the_timeout(self, tmp_path: Path) -> None:
        fake = tmp_path / "ffmpeg"
        fake.write_text("#!/bin/sh\nsleep 30\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        converter = FfmpegAudioConverter(executable=str(fake), timeout_s=0.5)

        started = asyncio.get_running_loop().time()
        with pytest.raises(AudioConversionError, match="longer than"):
            await converter.to_speech(MediaBlob(media_samples.synthetic_amr(), "audio/amr"))
        assert asyncio.get_running_loop().time() - started < 5

    async def test_the_event_loop_keeps_running_during_a_conversion(self, ffmpeg: str) -> None:
        converter = FfmpegAudioConverter(executable=ffmpeg)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            await converter.to_speech(MediaBlob(media_samples.amr_clip(), "audio/amr"))
        finally:
            ticker.cancel()
        assert ticks > 0

    async def test_without_an_executable_it_is_unavailable(self) -> None:
        converter = FfmpegAudioConverter(executable=None)

        assert not converter.available
        with pytest.raises(AudioConversionError):
            await converter.to_speech(MediaBlob(media_samples.synthetic_amr(), "audio/amr"))

    def test_a_configured_path_wins_and_a_wrong_one_finds_nothing(self, tmp_path: Path) -> None:
        fake = tmp_path / "my-ffmpeg"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

        assert find_ffmpeg(str(fake)) == str(fake)
        assert find_ffmpeg(str(tmp_path / "missing")) is None

    def test_the_imageio_ffmpeg_binary_is_found_without_one_on_path(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pytest.importorskip("imageio_ffmpeg")
        monkeypatch.setenv("PATH", "/nonexistent")

        found = find_ffmpeg()

        assert found is not None and os.access(found, os.X_OK)
        assert "imageio_ffmpeg" in found
