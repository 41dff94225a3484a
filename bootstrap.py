"""Composition root: settings → containers → the Starlette app; the command line. The only module that knows
concrete classes. How settings become options, texts, routes and start notes: adapters/inbound/settings.py.

    python bootstrap.py [--config PATH]            serve (default ./config.ini)
    python bootstrap.py check [--config PATH]      validate the configuration and try every dependency
    python bootstrap.py simulate [--config PATH]   chat with the Dify app in the console, as a customer would
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from dependency_injector import containers, providers

from adapters.inbound import settings as settings_map
from adapters.inbound.admin_api import AdminApi
from adapters.inbound.config_file import ConfigError, Settings, load_settings
from adapters.inbound.http import create_app, lifespan_for
from adapters.inbound.log_setup import configure_logging
from adapters.inbound.metrics import PrometheusMetrics
from adapters.inbound.settings import build_options as build_options  # re-exported: tests build options
from adapters.inbound.settings import build_texts as build_texts
from adapters.inbound.wecom_crypto import WeComCrypto
from adapters.inbound.wecom_webhook import WeComWebhook
from adapters.outbound.audio import FfmpegAudioConverter
from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel
from adapters.outbound.memory_store import MemoryStateStore
from adapters.outbound.system_clock import SystemClock
from adapters.outbound.wechat_text import WeChatTextRenderer
from adapters.outbound.wecom_api import WeComKfChannel
from application.admin import ConversationAdmin, StatusReport
from application.answer_message import AnswerCustomerMessage
from application.app_parameters import AppParametersCache
from application.ask_dify import AskDify, limiter_settings, retry_settings
from application.concurrency import AdaptiveLimiter
from application.dify_retry import RetryPolicy
from application.dispatcher import Dispatcher
from application.drain_customer import DrainCustomer
from application.handoff import HandOffToHuman
from application.lifecycle import Lifecycle
from application.media import MediaSupport
from application.options import BotOptions
from application.ports import ChatEngine, Clock
from application.pull_messages import PullMessages
from application.rate_limiter import CustomerRateLimiter
from application.rejections import RejectedCustomers
from application.routing import Routing
from application.session_events import SessionEvents
from application.session_state import SessionStates
from application.telemetry import Telemetry
from application.welcome import WelcomeCustomer
from domain.messages import CustomerRef

VERSION = "0.1.0"
log = logging.getLogger("kfdify")


# --- builders: settings → objects ----------------------------------------------------------------------


def build_store(settings: Settings) -> Any:
    if settings.memcache is None:
        return MemoryStateStore(conversation_idle_ttl_s=settings.conversation_idle_ttl_s)
    from adapters.outbound.memcached_store import MemcachedStateStore
    from application.failover_store import FailoverStateStore

    primary = MemcachedStateStore(
        servers=settings.memcache.servers,
        prefix=settings.memcache.prefix,
        connect_timeout=settings.memcache.connect_timeout,
        timeout=settings.memcache.timeout,
        conversation_idle_ttl_s=settings.conversation_idle_ttl_s,
    )
    fallback = MemoryStateStore(conversation_idle_ttl_s=settings.conversation_idle_ttl_s)
    return FailoverStateStore(primary, fallback)


def build_dify(
    settings: Settings, *, base_url: str | None = None, api_key: str | None = None
) -> DifyChatEngine:
    return DifyChatEngine(
        base_url=base_url or settings.dify_api_base,
        api_key=api_key or settings.dify_api_key,
        response_mode=settings.dify_response_mode,
        connect_timeout=settings.dify_connect_timeout_s,
        idle_timeout=settings.dify_idle_timeout_s,
        total_timeout=settings.dify_total_timeout_s,
        max_connections=max(settings.dify_concurrency, 1) + 8,
        file_hosts=settings.file_hosts,
    )


def build_audio(settings: Settings) -> FfmpegAudioConverter:
    """ffmpeg for voice messages: [BOT] FFMPEG, else PATH, else the imageio-ffmpeg package; "off" = none."""
    if settings.ffmpeg.lower() == "off":
        return FfmpegAudioConverter(executable=None)
    converter = FfmpegAudioConverter.located(
        configured=settings.ffmpeg, timeout_s=settings.ffmpeg_timeout_s, output_format=settings.voice_format
    )
    if not converter.available:
        log.warning(
            "no ffmpeg found (%s): voice messages get the 'unsupported' text; install ffmpeg or the "
            "imageio-ffmpeg package",
            settings.ffmpeg or "PATH, imageio-ffmpeg",
        )
    return converter


def voice_probe(settings: Settings) -> str | None:
    """The ffmpeg `check` reports for voice messages (None: none found or turned off)."""
    return build_audio(settings).executable


def build_channel(settings: Settings) -> WeComKfChannel:
    return WeComKfChannel(
        corp_id=settings.corp_id, corp_secret=settings.corp_secret, api_base=settings.wecom_api_base
    )


def build_routing(settings: Settings, default_engine: ChatEngine, options: BotOptions) -> Routing:
    """The kf routes; an account with its own Dify app gets its own engine."""
    return settings_map.build_routing(settings, default_engine, options, partial(_route_engine, settings))


def _route_engine(settings: Settings, base_url: str, api_key: str) -> DifyChatEngine:
    return build_dify(settings, base_url=base_url, api_key=api_key)


def owner_id() -> str:
    """Names this process in leases: host, pid and a random part (pids repeat across restarts)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def closers_of(*parts: object, routing: Routing) -> list[Callable[[], Awaitable[object]]]:
    """The `aclose` of each distinct part and of every route's chat engine, in that order: what the
    lifecycle closes at stop."""
    closers: list[Callable[[], Awaitable[object]]] = []
    seen: set[int] = set()
    for part in (*parts, *(route.engine for route in routing.all_routes())):
        close = getattr(part, "aclose", None)
        if close is not None and id(part) not in seen:
            closers.append(close)
        seen.add(id(part))
    return closers


def started_now(clock: Clock) -> float:
    return clock.now()


def is_persistent(store_backend: str) -> bool:
    return store_backend != "memory"


def accepting_flag(lifecycle: Lifecycle) -> Callable[[], bool]:
    """The webhook's "are we accepting callbacks" question, answered by the lifecycle."""

    def accepting() -> bool:
        return lifecycle.accepting

    return accepting


# --- containers ----------------------------------------------------------------------------------------


class Adapters(containers.DeclarativeContainer):
    """The real outbound adapters (and the callback crypto)."""

    settings = providers.Dependency(instance_of=Settings)
    clock = providers.Singleton(SystemClock)
    store = providers.Singleton(build_store, settings)
    channel = providers.Singleton(build_channel, settings)
    engine = providers.Singleton(build_dify, settings)
    audio = providers.Singleton(build_audio, settings)
    renderer = providers.Singleton(WeChatTextRenderer)
    crypto = providers.Singleton(
        WeComCrypto,
        token=settings.provided.token,
        encoding_aes_key=settings.provided.encoding_aes_key,
        receive_id=settings.provided.corp_id,
    )


class Application(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)
    adapters = providers.DependenciesContainer()

    owner = providers.Singleton(owner_id)
    telemetry = providers.Singleton(Telemetry)
    options = providers.Singleton(build_options, settings)
    routing = providers.Singleton(build_routing, settings, adapters.engine, options)
    started_at = providers.Singleton(started_now, adapters.clock)

    sessions = providers.Singleton(
        SessionStates,
        channel=adapters.channel,
        clock=adapters.clock,
        telemetry=telemetry,
        ttl_s=options.provided.session_state_ttl_s,
    )
    rejections = providers.Singleton(
        RejectedCustomers, clock=adapters.clock, memory_s=options.provided.rejection_memory_s
    )
    rate_limiter = providers.Singleton(
        CustomerRateLimiter,
        rule=providers.Callable(settings_map.rate_limit_rule, options),
        clock=adapters.clock,
    )
    handoff = providers.Singleton(
        HandOffToHuman, channel=adapters.channel, sessions=sessions, telemetry=telemetry
    )
    media = providers.Singleton(
        MediaSupport,
        channel=adapters.channel,
        routing=routing,
        converter=adapters.audio,
        clock=adapters.clock,
        options=options,
        telemetry=telemetry,
    )
    dify_limiter = providers.Singleton(
        AdaptiveLimiter, clock=adapters.clock, settings=providers.Callable(limiter_settings, options)
    )
    dify_retry = providers.Singleton(
        RetryPolicy, clock=adapters.clock, settings=providers.Callable(retry_settings, options)
    )
    ask = providers.Singleton(
        AskDify,
        conversations=adapters.store,
        clock=adapters.clock,
        options=options,
        telemetry=telemetry,
        limiter=dify_limiter,
        retry=dify_retry,
    )
    answer = providers.Singleton(
        AnswerCustomerMessage,
        ask=ask,
        channel=adapters.channel,
        routing=routing,
        options=options,
        telemetry=telemetry,
        render=adapters.renderer,
        media=media,
        sessions=sessions,
        handoff=handoff,
        rate_limiter=rate_limiter,
        rejections=rejections,
    )
    app_parameters = providers.Singleton(AppParametersCache, ttl_s=options.provided.app_parameters_ttl_s)
    welcome = providers.Singleton(
        WelcomeCustomer,
        channel=adapters.channel,
        routing=routing,
        clock=adapters.clock,
        options=options,
        telemetry=telemetry,
        rejections=rejections,
        parameters=app_parameters,
        render=adapters.renderer,
    )
    observer = providers.Singleton(
        SessionEvents, sessions=sessions, welcome=welcome, rejections=rejections, telemetry=telemetry
    )
    pull = providers.Singleton(
        PullMessages,
        store=adapters.store,
        channel=adapters.channel,
        clock=adapters.clock,
        options=options,
        telemetry=telemetry,
        observer=observer,
        owner=owner,
        persistent_store=providers.Callable(is_persistent, adapters.store.provided.backend),
        started_at=started_at,
    )
    drain = providers.Singleton(
        DrainCustomer,
        store=adapters.store,
        answer=answer,
        options=options,
        telemetry=telemetry,
        owner=owner,
        clock=adapters.clock,
        pairing=media,
    )
    dispatcher = providers.Singleton(
        Dispatcher,
        store=adapters.store,
        pull=pull,
        drain=drain,
        options=options,
        telemetry=telemetry,
        owner=owner,
    )
    lifecycle = providers.Singleton(
        Lifecycle,
        dispatcher=dispatcher,
        grace_s=settings.provided.shutdown_grace_s,
        closers=providers.Callable(closers_of, observer, adapters.channel, adapters.store, routing=routing),
        start_notes=providers.Callable(
            settings_map.start_notes, settings, adapters.store.provided.backend, VERSION
        ),
    )
    webhook = providers.Singleton(
        WeComWebhook,
        crypto=adapters.crypto,
        on_notice=dispatcher.provided.on_notice,
        telemetry=telemetry,
        accepting=providers.Callable(accepting_flag, lifecycle),
    )
    conversation_admin = providers.Singleton(
        ConversationAdmin,
        store=adapters.store,
        configured_kfs=providers.Callable(settings_map.configured_kfs, settings),
    )
    status = providers.Singleton(
        StatusReport,
        store=adapters.store,
        telemetry=telemetry,
        version=VERSION,
        extra=dify_limiter.provided.status_section,
    )
    admin = providers.Singleton(
        AdminApi,
        admin_token=settings.provided.admin_token,
        conversations=conversation_admin,
        status=status,
    )
    metrics = providers.Singleton(PrometheusMetrics, telemetry, dify_apps=dify_limiter.provided.status)
    app = providers.Singleton(
        create_app,
        webhook=webhook,
        admin=admin,
        metrics=metrics.provided.endpoint,
        lifespan=providers.Callable(lifespan_for, lifecycle.provided.start, lifecycle.provided.stop),
        version=VERSION,
    )


def build_container(settings: Settings, adapters: containers.Container | None = None) -> Application:
    adapters = adapters or Adapters(settings=settings)
    return Application(settings=settings, adapters=adapters)


# --- command line --------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bootstrap.py", description="kf-dify: WeCom kf × Dify bridge")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "check", "simulate"])
    parser.add_argument("--config", default=None, help="path to config.ini (default ./config.ini)")
    return parser.parse_args(list(argv))


def load_or_exit(path: str | None, environ: Mapping[str, str]) -> Settings:
    try:
        return load_settings(path, environ)
    except ConfigError as exc:
        print(f"kf-dify: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    from adapters.inbound.server import listeners_from
    from adapters.inbound.server import serve as serve_listeners

    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    container = build_container(settings)
    app = container.app()
    # Tens of thousands of import-time objects would otherwise be walked by every full collection, a
    # 40 ms stop of the event loop that shows up as webhook p99 (bench/FINDINGS.md).
    gc.collect()
    gc.freeze()
    serve_listeners(app, listeners_from(settings))


@dataclass(frozen=True, slots=True)
class SimulationParts:
    """The real application core and Dify adapter with an in-process WeCom and store, for `simulate`."""

    push_text: Callable[[str], None]
    sent_texts: Callable[[], list[str]]
    notify: Callable[[], None]
    idle: Callable[[], Awaitable[None]]
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]
    app_label: str


SIMULATED_KF = "wk-simulate"
SIMULATED_CUSTOMER = "wm-operator"


def build_simulation(settings: Settings) -> SimulationParts:
    simulated = replace(settings, memcache=None)  # state in memory
    channel = FakeKfChannel()
    container = build_container(simulated, Adapters(settings=simulated, channel=providers.Object(channel)))
    container.lifecycle.override(
        providers.Singleton(
            Lifecycle,
            dispatcher=container.dispatcher,
            grace_s=settings.shutdown_grace_s,
            closers=providers.Callable(closers_of, routing=container.routing),
        )
    )
    dispatcher, lifecycle = container.dispatcher(), container.lifecycle()

    def push_text(text: str) -> None:
        channel.world.add_customer_text(SIMULATED_KF, SIMULATED_CUSTOMER, text)

    return SimulationParts(
        push_text=push_text,
        sent_texts=partial(channel.world.texts_sent_to, CustomerRef(SIMULATED_KF, SIMULATED_CUSTOMER)),
        notify=partial(dispatcher.notify, SIMULATED_KF),
        idle=dispatcher.idle,
        start=lifecycle.start,
        stop=lifecycle.stop,
        app_label=settings.dify_api_base,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if args.command == "check":
        from adapters.inbound.cli_check import run_check

        # Quiet: the report is the output; adapters' own error logs would only repeat it.
        configure_logging(level="CRITICAL", fmt="text")
        try:
            loaded = load_settings(args.config, env)
            settings: Settings | None = loaded
            problems: list[str] = []
            source = loaded.source
        except ConfigError as exc:
            settings, problems, source = None, exc.problems, exc.source
        return run_check(
            settings,
            problems,
            channel_factory=build_channel,
            engine_factory=build_dify,
            store_factory=build_store,
            out=sys.stdout,
            config_source=source,
            voice_probe=voice_probe,
        )
    settings = load_or_exit(args.config, env)
    if args.command == "serve":
        serve(settings)
        return 0
    from adapters.inbound.cli_simulate import run_simulate

    configure_logging(level="ERROR", fmt="text", secrets=settings.secrets())
    parts = build_simulation(settings)
    return run_simulate(
        push_text=parts.push_text,
        sent_texts=parts.sent_texts,
        notify=parts.notify,
        idle=parts.idle,
        start=parts.start,
        stop=parts.stop,
        app_label=parts.app_label,
        stdin=sys.stdin,
        stdout=sys.stdout,
        reset_words=build_options(settings).reset_words,
    )


if __name__ == "__main__":
    raise SystemExit(main())
