"""Every adapter and fake provides the port it stands for, checked twice: statically by mypy (the typed
assignments in `_assignable`, never called) and at run time by comparing each member of the port (whatever
members it has today) with the class's: name, sync or async, parameter names, kinds and defaults. A port that
grows a method fails here until every implementation has it, with or without mypy. The state store roles are
checked the same way in tests/contract/test_state_roles.py."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from adapters.inbound.metrics import PrometheusMetrics
from adapters.outbound.audio import FakeAudioConverter, FfmpegAudioConverter
from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_dify import FakeChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel
from adapters.outbound.system_clock import SystemClock
from adapters.outbound.wecom_api import WeComKfChannel
from application.media import MediaSupport
from application.media_port import ImagePairing, MediaPreparer
from application.ports import AudioConverter, ChatEngine, Clock, KfChannel
from application.pull_messages import ItemObserver
from application.session_events import SessionEvents
from application.telemetry import TelemetryListener
from tests.support.containers import FakeClock

# Each port with the classes that implement it (adapters, fakes and the application's own implementations).
IMPLEMENTATIONS: tuple[tuple[type[Any], tuple[type[Any], ...]], ...] = (
    (ChatEngine, (DifyChatEngine, FakeChatEngine)),
    (KfChannel, (WeComKfChannel, FakeKfChannel)),
    (AudioConverter, (FfmpegAudioConverter, FakeAudioConverter)),
    (Clock, (SystemClock, FakeClock)),
    (TelemetryListener, (PrometheusMetrics,)),
    (MediaPreparer, (MediaSupport,)),
    (ImagePairing, (MediaSupport,)),
    (ItemObserver, (SessionEvents,)),
)
PAIRS = [(port, impl) for port, impls in IMPLEMENTATIONS for impl in impls]


def _assignable(
    dify: DifyChatEngine,
    fake_dify: FakeChatEngine,
    wecom: WeComKfChannel,
    fake_wecom: FakeKfChannel,
    ffmpeg: FfmpegAudioConverter,
    fake_audio: FakeAudioConverter,
    system_clock: SystemClock,
    fake_clock: FakeClock,
    metrics: PrometheusMetrics,
    media: MediaSupport,
    events: SessionEvents,
) -> list[object]:
    """Never called: mypy checks that each implementation is assignable to its port."""
    engines: list[ChatEngine] = [dify, fake_dify]
    channels: list[KfChannel] = [wecom, fake_wecom]
    converters: list[AudioConverter] = [ffmpeg, fake_audio]
    clocks: list[Clock] = [system_clock, fake_clock]
    listener: TelemetryListener = metrics
    preparer: MediaPreparer = media
    pairing: ImagePairing = media
    observer: ItemObserver = events
    return [engines, channels, converters, clocks, listener, preparer, pairing, observer]


def _members(port: type[Any]) -> list[str]:
    """The port's own members (methods and properties), including those of the protocols it extends."""
    names: list[str] = []
    for klass in port.__mro__:
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in names:
                continue
            if callable(value) or isinstance(value, property):
                names.append(name)
    return names


def _declared(port: type[Any], name: str) -> Any:
    return next(vars(k)[name] for k in port.__mro__ if name in vars(k))


def test_every_port_has_members() -> None:
    assert all(_members(port) for port, _ in IMPLEMENTATIONS)


@pytest.mark.parametrize(
    ("port", "implementation"), PAIRS, ids=[f"{i.__name__}-{p.__name__}" for p, i in PAIRS]
)
def test_each_implementation_provides_its_port(port: type[Any], implementation: type[Any]) -> None:
    where = f"{implementation.__name__} as {port.__name__}"
    for name in _members(port):
        wanted = _declared(port, name)
        provided = inspect.getattr_static(implementation, name, None)
        assert provided is not None, f"{where}: lacks {name}"
        if isinstance(wanted, property):
            assert isinstance(provided, property), f"{where}: {name} is not a property"
            continue
        assert callable(provided) and not isinstance(provided, property), f"{where}: {name} is not a method"
        is_async = inspect.iscoroutinefunction(wanted)
        assert inspect.iscoroutinefunction(provided) == is_async, (
            f"{where}: {name} must {'' if is_async else 'not '}be async, as in the port"
        )
        expected = inspect.signature(wanted)
        actual = inspect.signature(provided)
        assert [(p.name, p.kind) for p in actual.parameters.values()] == [
            (p.name, p.kind) for p in expected.parameters.values()
        ], f"{where}: {name}{actual} differs from {name}{expected}"
        assert {p.name: p.default for p in actual.parameters.values()} == {
            p.name: p.default for p in expected.parameters.values()
        }, f"{where}: the defaults of {name}{actual} differ from {name}{expected}"
