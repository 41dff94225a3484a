"""A fake-adapters container: the same provider names as bootstrap.Adapters, bound to in-memory fakes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dependency_injector import containers, providers

import bootstrap
from adapters.inbound.config_file import Settings
from adapters.inbound.wecom_crypto import WeComCrypto
from adapters.outbound.audio import FakeAudioConverter
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel, KfWorld
from adapters.outbound.memory_store import MemoryStateStore

TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
CORP_ID = "wwUnitTestCorp"


class FakeClock:
    def __init__(self, start: float | None = None) -> None:
        self.value = start if start is not None else time.time()

    def now(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


def as_is(text: str) -> str:
    """The renderer of the fake adapters: answers go out exactly as the engine wrote them."""
    return text


class FakeAdapters(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)
    clock = providers.Singleton(FakeClock)
    world = providers.Singleton(KfWorld)
    store = providers.Singleton(MemoryStateStore)
    channel = providers.Singleton(FakeKfChannel, world)
    engine = providers.Singleton(FakeChatEngine)
    audio = providers.Singleton(FakeAudioConverter)
    renderer = providers.Object(as_is)
    crypto = providers.Singleton(
        WeComCrypto,
        token=settings.provided.token,
        encoding_aes_key=settings.provided.encoding_aes_key,
        receive_id=settings.provided.corp_id,
    )


def unit_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        corp_id=CORP_ID,
        corp_secret="unit-secret",
        token=TOKEN,
        encoding_aes_key=AES_KEY,
        dify_api_base="http://dify.invalid/v1",
        dify_api_key="app-unit",
        admin_token="unit-admin",
        recovery_interval_s=0.0,
        shutdown_grace_s=2.0,
        # Tests that want the interim text (default 5 s) turn it on themselves.
        interim_after_s=0.0,
    )
    base.update(overrides)
    return Settings(**base)


def fake_application(
    settings: Settings | None = None, *, customize: Callable[[FakeAdapters], None] | None = None
) -> bootstrap.Application:
    settings = settings or unit_settings()
    adapters = FakeAdapters(settings=settings)
    if customize is not None:
        customize(adapters)
    return bootstrap.build_container(settings, adapters)
