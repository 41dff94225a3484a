"""The composition root: providers hold no logic, settings map onto routes and start notes, closers close
every client once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from dependency_injector import providers

import bootstrap
from adapters.inbound.config_file import KfRouteSettings
from adapters.inbound.settings import build_routing, configured_kfs, start_notes
from adapters.outbound.fake_dify import FakeChatEngine
from application.options import BotOptions
from application.ports import ChatEngine
from application.routing import KfRoute, Routing
from tests.support.containers import unit_settings


def _walk(provider: providers.Provider[Any], seen: set[int]) -> Iterator[providers.Provider[Any]]:
    if id(provider) in seen:
        return
    seen.add(id(provider))
    yield provider
    for related in provider.related:
        if isinstance(related, providers.Provider):
            yield from _walk(related, seen)


def test_no_provider_wraps_a_lambda() -> None:
    seen: set[int] = set()
    for container in (bootstrap.Adapters, bootstrap.Application):
        for top in container.providers.values():
            for provider in _walk(top, seen):
                provides = getattr(provider, "provides", None)
                assert getattr(provides, "__name__", "") != "<lambda>", provider


def test_a_route_with_another_dify_app_gets_its_own_engine() -> None:
    settings = unit_settings(
        servicer_userid="default-servicer",
        kf_routes=(
            KfRouteSettings(
                open_kfid="wkSame", dify_api_base="", dify_api_key="app-unit", texts={"welcome": "同一个"}
            ),
            KfRouteSettings(
                open_kfid="wkOther",
                dify_api_base="http://other.invalid/v1",
                dify_api_key="app-other",
                servicer_userid="lisi",
            ),
        ),
    )
    default = FakeChatEngine()
    made: list[tuple[str, str]] = []

    def engine_for(base_url: str, api_key: str) -> ChatEngine:
        made.append((base_url, api_key))
        return FakeChatEngine()

    routing = build_routing(settings, default, BotOptions(), engine_for)

    assert made == [("http://other.invalid/v1", "app-other")]
    same, other = routing.for_kf("wkSame"), routing.for_kf("wkOther")
    assert same.engine is default and same.texts.welcome == "同一个"
    assert same.servicer_userid == "default-servicer"
    assert other.engine is not default and other.servicer_userid == "lisi"
    assert routing.for_kf("wkUnknown") is routing.default
    assert configured_kfs(settings) == ["wkSame", "wkOther"]


def test_start_notes_warn_about_memory_state_and_a_missing_admin_token() -> None:
    notes = start_notes(unit_settings(admin_token=""), "memory", "9.9")
    warnings = [text for level, text in notes if level == logging.WARNING]
    assert any("in-process memory" in text for text in warnings)
    assert any("ADMIN_TOKEN" in text for text in warnings)
    assert "kf-dify 9.9" in notes[0][1]
    assert start_notes(unit_settings(), "memcached", "9.9")[1][0] == logging.INFO


class _Closable:
    def __init__(self) -> None:
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def test_closers_close_every_distinct_client_once() -> None:
    shared = _Closable()
    engine_a, engine_b = FakeChatEngine(), FakeChatEngine()
    texts = BotOptions().texts
    routing = Routing(
        default=KfRoute("default", engine_a, texts),
        routes={"wk1": KfRoute("wk1", engine_a, texts), "wk2": KfRoute("wk2", engine_b, texts)},
    )

    closers = bootstrap.closers_of(shared, object(), shared, routing=routing)

    expected = [shared.aclose] + [e.aclose for e in (engine_a, engine_b) if hasattr(e, "aclose")]
    assert closers == expected
