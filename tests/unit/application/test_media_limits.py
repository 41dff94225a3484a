"""Media is expensive (downloads, ffmpeg, paid transcriptions): the fair-use limit is counted before any of
it, and voice work runs behind one limit for the whole instance."""

from __future__ import annotations

import asyncio

import pytest
from dependency_injector import providers

import bootstrap
from adapters.outbound.audio import FakeAudioConverter
from adapters.outbound.fake_dify import DEFAULT_TRANSCRIPT, FakeChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from application.media import MediaSupport
from application.media_port import MediaPreparer
from application.options import ReplyTexts
from domain.chat import AppParameters
from domain.media import MediaBlob
from tests.support import media_samples
from tests.support.containers import FakeAdapters, fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkLimits"
TEXTS = ReplyTexts()
IMAGES = {
    "enabled": True,
    "allowed_file_types": ["image", "document"],
    "allowed_file_upload_methods": ["local_file"],
    "number_limits": 3,
}


class CountingChannel(FakeKfChannel):
    """The fake channel, remembering every media/get."""

    def __init__(self, world: KfWorld) -> None:
        super().__init__(world)
        self.downloads: list[str] = []

    async def download_media(self, media_id: str, *, max_bytes: int) -> MediaBlob:
        self.downloads.append(media_id)
        return await super().download_media(media_id, max_bytes=max_bytes)


class GatedConverter(FakeAudioConverter):
    """Holds every conversion until released; counts how many run at once."""

    def __init__(self, *, expect: int) -> None:
        super().__init__()
        self.active = 0
        self.most = 0
        self.expected_reached = asyncio.Event()
        self.release = asyncio.Event()
        self._expect = expect

    async def to_speech(self, audio: MediaBlob) -> MediaBlob:
        self.active += 1
        self.most = max(self.most, self.active)
        if self.active >= self._expect:
            self.expected_reached.set()
        try:
            await self.release.wait()
            return await super().to_speech(audio)
        finally:
            self.active -= 1


def media_app(
    *, rate_limit: int = 0, converter: FakeAudioConverter | None = None
) -> tuple[bootstrap.Application, FakeChatEngine, FakeAudioConverter]:
    engine = FakeChatEngine(app_parameters=AppParameters(file_upload=dict(IMAGES), speech_to_text=True))
    audio = converter or FakeAudioConverter()

    def customize(adapters: FakeAdapters) -> None:
        adapters.engine.override(providers.Object(engine))
        adapters.audio.override(providers.Object(audio))
        adapters.channel.override(providers.Singleton(CountingChannel, adapters.world))

    settings = unit_settings(rate_limit=rate_limit, rate_limit_window_s=60, image_text_window_s=0.0)
    return fake_application(settings, customize=customize), engine, audio


async def run(app: bootstrap.Application) -> None:
    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(app.dispatcher().idle(), 20)


def texts(world: KfWorld, customer: str) -> list[str]:
    return [s.text for s in world.sent if s.customer.external_userid == customer]


async def test_over_the_limit_voice_is_neither_downloaded_nor_converted_nor_transcribed() -> None:
    app, engine, converter = media_app(rate_limit=1)
    world: KfWorld = app.adapters.world()
    world.add_customer_text(KF, "wmFlood", "q0")
    await run(app)
    for _ in range(3):
        world.add_customer_media(KF, "wmFlood", "voice", media_samples.synthetic_amr(), "audio/amr")

    await run(app)

    channel: CountingChannel = app.adapters.channel()
    assert channel.downloads == []
    assert converter.converted == [] and engine.transcriptions == []
    assert [q.query for q in engine.questions] == ["q0"]
    assert texts(world, "wmFlood") == ["答：q0", TEXTS.rate_limited]
    assert app.telemetry().labelled["rate_limited"] == {"notify": 1, "drop": 2}


async def test_over_the_limit_images_and_files_are_not_downloaded() -> None:
    app, engine, _ = media_app(rate_limit=1)
    world: KfWorld = app.adapters.world()
    world.add_customer_text(KF, "wmPics", "q0")
    world.add_customer_media(KF, "wmPics", "image", media_samples.png(), "image/png")
    world.add_customer_media(KF, "wmPics", "file", b"%PDF-1.4 x", "application/pdf", filename="a.pdf")

    await run(app)

    channel: CountingChannel = app.adapters.channel()
    assert channel.downloads == [] and engine.uploads == {}
    assert texts(world, "wmPics") == ["答：q0", TEXTS.rate_limited]


async def test_voice_within_the_limit_counts_once() -> None:
    app, engine, _ = media_app(rate_limit=2)
    world: KfWorld = app.adapters.world()
    world.add_customer_media(KF, "wmTalk", "voice", media_samples.synthetic_amr(), "audio/amr")
    world.add_customer_text(KF, "wmTalk", "q1")
    world.add_customer_text(KF, "wmTalk", "q2")

    await run(app)

    assert [q.query for q in engine.questions] == [DEFAULT_TRANSCRIPT, "q1"]
    assert texts(world, "wmTalk") == [f"答：{DEFAULT_TRANSCRIPT}", "答：q1", TEXTS.rate_limited]


async def test_voice_conversions_run_behind_one_limit_for_the_instance() -> None:
    converter = GatedConverter(expect=2)
    app, engine, _ = media_app(converter=converter)
    limited: MediaPreparer = MediaSupport(  # (mypy checks that MediaSupport implements the port)
        channel=app.adapters.channel(),
        routing=app.routing(),
        converter=converter,
        clock=app.adapters.clock(),
        options=app.options(),
        telemetry=app.telemetry(),
        voice_concurrency=2,
    )
    app.media.override(providers.Object(limited))
    world: KfWorld = app.adapters.world()
    customers = [f"wmVoice{i}" for i in range(5)]
    for customer in customers:
        world.add_customer_media(KF, customer, "voice", media_samples.synthetic_amr(), "audio/amr")

    app.dispatcher().notify(KF, "tok")
    await asyncio.wait_for(converter.expected_reached.wait(), 20)
    # Every other drain gets every chance to start its conversion: none may while two are running.
    channel: CountingChannel = app.adapters.channel()
    for _ in range(200):
        await asyncio.sleep(0)
    assert converter.active == 2 and len(channel.downloads) == 5
    converter.release.set()
    await asyncio.wait_for(app.dispatcher().idle(), 20)

    assert converter.most == 2
    assert len(engine.transcriptions) == 5
    assert all(texts(world, c) == [f"答：{DEFAULT_TRANSCRIPT}"] for c in customers)
