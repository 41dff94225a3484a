"""Composition root: settings → containers → the Starlette app; the command line. The only module that knows
concrete classes. How settings become options, texts, routes and start notes: adapters/inbound/settings.py.

    python bootstrap.py [--config PATH]            serve (default ./config.ini)
    python bootstrap.py check [--config PATH]      validate the configuration and try every dependency
    python bootstrap.py simulate [--config PATH]   chat with the Dify app in the console, as a customer would
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any
from urllib.parse import quote

from dependency_injector import containers, providers

from adapters.inbound import settings as settings_map
from adapters.inbound.admin_api import AdminApi
from adapters.inbound.cli_simulate import (
    SIMULATED_CUSTOMER,
    SIMULATED_KF,
    SimulationParts,
    entry_note,
    run_parts,
)
from adapters.inbound.command_line import load_for_check, load_or_exit, parse_args
from adapters.inbound.config_file import Settings
from adapters.inbound.console_api import ConsoleApi, TryChat, TrySessions
from adapters.inbound.console_try import ConsoleTryChat, EventMessage
from adapters.inbound.http import create_app, lifespan_for
from adapters.inbound.log_setup import configure_logging
from adapters.inbound.metrics import PrometheusMetrics
from adapters.inbound.settings import build_options as build_options  # re-exported: tests build options
from adapters.inbound.settings import build_texts as build_texts
from adapters.inbound.wecom_crypto import WeComCrypto
from adapters.inbound.wecom_webhook import WeComWebhook
from adapters.inbound.wiring import (
    accepting_flag,
    build_insights,
    closers_of,
    drains_per_instance,
    is_persistent,
    merged_sections,
    owner_id,
    room_when_shared,
    shared_with_instances,
    start_then_report,
    started_now,
)
from adapters.outbound.audio import FfmpegAudioConverter
from adapters.outbound.dify import DifyChatEngine
from adapters.outbound.fake_wecom import FakeKfChannel
from adapters.outbound.memory_store import MemoryStateStore
from adapters.outbound.system_clock import SystemClock
from adapters.outbound.wechat_text import WeChatTextRenderer
from adapters.outbound.wecom_api import WeComKfChannel
from application.admin import ConversationAdmin, StatusReport
from application.answer_message import AnswerCustomerMessage
from application.app_inputs import AppInputs
from application.app_parameters import AppParametersCache
from application.ask_dify import AskDify, limiter_settings, retry_settings
from application.concurrency import AdaptiveLimiter
from application.conversation_names import ConversationNamer
from application.customer_profile import ProfileBook
from application.dify_retry import RetryPolicy
from application.dispatcher import Dispatcher
from application.drain_customer import DrainCustomer
from application.handoff import HandOffToHuman
from application.handoff_feedback import HandoffFeedback
from application.lifecycle import Lifecycle
from application.media import MediaSupport
from application.options import BotOptions
from application.ports import ChatEngine
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


def try_chat_factory(settings: Settings) -> Callable[[str | None], TryChat]:
    """The console's try-it chats: `simulate`'s parts, for the default app or a kf account's app."""
    return partial(build_try_chat, settings)


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
        notes=providers.Callable(shared_with_instances, adapters.store),
    )
    rejections = providers.Singleton(
        RejectedCustomers,
        clock=adapters.clock,
        memory_s=options.provided.rejection_memory_s,
        notes=providers.Callable(shared_with_instances, adapters.store),
    )
    rate_limiter = providers.Singleton(
        CustomerRateLimiter,
        rule=providers.Callable(settings_map.rate_limit_rule, options),
        clock=adapters.clock,
        counters=providers.Callable(shared_with_instances, adapters.store),
        notes=providers.Callable(shared_with_instances, adapters.store),
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
    # Customer context (issue #17): profiles, the app's input variables, conversation names, handoff feedback.
    profiles = providers.Singleton(
        ProfileBook, store=adapters.store, directory=adapters.channel, telemetry=telemetry
    )
    app_inputs = providers.Singleton(
        AppInputs, parameters=app_parameters, profiles=profiles, static=options.provided.inputs
    )
    namer = providers.Singleton(ConversationNamer, profiles=profiles, telemetry=telemetry)
    handoff_feedback = providers.Singleton(
        HandoffFeedback,
        conversations=adapters.store,
        clock=adapters.clock,
        telemetry=telemetry,
        window_s=options.provided.feedback_window_s,
        enabled=options.provided.handoff_feedback,
    )
    ask.add_kwargs(inputs=app_inputs, namer=namer)
    handoff.add_kwargs(feedback=handoff_feedback)
    observer.add_kwargs(profiles=profiles)
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
        max_drains=providers.Callable(drains_per_instance, options, adapters.store.provided.backend),
        capacity=providers.Callable(room_when_shared, dify_limiter, adapters.store.provided.backend),
    )
    # The console's try-it chats: stopped with the service.
    try_sessions = providers.Singleton(TrySessions, providers.Callable(try_chat_factory, settings))
    lifecycle = providers.Singleton(
        Lifecycle,
        dispatcher=dispatcher,
        grace_s=settings.provided.shutdown_grace_s,
        closers=providers.Callable(
            closers_of,
            observer,
            profiles,
            namer,
            handoff_feedback,
            app_inputs,
            adapters.channel,
            adapters.store,
            try_sessions,
            routing=routing,
        ),
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
    conversation_admin.add_kwargs(profiles=adapters.store)  # issue #17: the customer's profile too
    insights = providers.Singleton(build_insights, telemetry, owner)
    status = providers.Singleton(
        StatusReport,
        store=adapters.store,
        telemetry=telemetry,
        version=VERSION,
        extra=providers.Callable(
            merged_sections, insights.provided.status_section, dify_limiter.provided.status_section
        ),
    )
    admin = providers.Singleton(
        AdminApi,
        admin_token=settings.provided.admin_token,
        conversations=conversation_admin,
        status=status,
    )
    metrics = providers.Singleton(PrometheusMetrics, telemetry, dify_apps=dify_limiter.provided.status)
    console = providers.Singleton(
        ConsoleApi,
        admin=admin,
        status=status,
        insights=insights,
        conversations=conversation_admin,
        sessions=sessions,
        try_sessions=try_sessions,
        kf_accounts=providers.Callable(settings_map.configured_kfs, settings),
    )
    app = providers.Singleton(
        create_app,
        webhook=webhook,
        admin=admin,
        metrics=metrics.provided.endpoint,
        lifespan=providers.Callable(
            lifespan_for,
            providers.Callable(start_then_report, lifecycle.provided.start, app_inputs, routing),
            lifecycle.provided.stop,
        ),
        version=VERSION,
        console=console,
    )


def build_container(settings: Settings, adapters: containers.Container | None = None) -> Application:
    adapters = adapters or Adapters(settings=settings)
    return Application(settings=settings, adapters=adapters)


# --- command line --------------------------------------------------------------------------------------


def serve(settings: Settings) -> None:
    from adapters.inbound.gc_policy import GcPolicy
    from adapters.inbound.pipeline_loop import PipelineLoop, front_door, on_pipeline, prefer_short_switches
    from adapters.inbound.server import listeners_from
    from adapters.inbound.server import serve as serve_listeners

    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    container = build_container(settings)
    # The pipeline (lifespan, pulls, answers, admin API) on its own loop and thread; callbacks are
    # acknowledged on uvicorn's, so a burst's answer work never delays WeCom's acknowledgement.
    pipeline = PipelineLoop()
    front = front_door(
        webhook=container.webhook().handed_off(pipeline.call),
        pipeline_app=on_pipeline(container.app(), pipeline),
    )
    dispatcher = container.dispatcher()

    def quiet() -> bool:
        return dispatcher.draining == 0  # no customer being answered (a lingering scan is no work)

    # Every collection on the pipeline's loop; full ones only when quiet (or overdue): one during a burst
    # held both loops for 50-160 ms.
    collector = GcPolicy(quiet).take_over()
    prefer_short_switches()
    pipeline.start()
    pipeline.background(collector.run)
    try:
        serve_listeners(front, listeners_from(settings))
    finally:
        pipeline.stop()
        collector.give_back()


def build_simulation(
    settings: Settings,
    *,
    channel: FakeKfChannel | None = None,
    kf: str = SIMULATED_KF,
    scene: str = "",
    scene_param: str = "",
    nickname: str = "",
) -> SimulationParts:
    simulated = replace(settings, memcache=None)  # state in memory
    channel = channel or FakeKfChannel()
    seed_simulated_customer(channel, kf=kf, scene=scene, scene_param=scene_param, nickname=nickname)
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
        channel.world.add_customer_text(kf, SIMULATED_CUSTOMER, text)

    def push_tap(text: str, menu_id: str) -> None:
        channel.world.add_customer_text(kf, SIMULATED_CUSTOMER, text, menu_id=menu_id)

    def merged_count() -> int:
        return container.telemetry().counters["merged_messages"]

    return SimulationParts(
        push_text=push_text,
        sent_texts=partial(channel.world.texts_sent_to, CustomerRef(kf, SIMULATED_CUSTOMER)),
        notify=partial(dispatcher.notify, kf),
        idle=dispatcher.idle,
        start=lifecycle.start,
        stop=lifecycle.stop,
        app_label=settings.dify_api_base,
        sent_menus=partial(channel.world.menus_sent_to, CustomerRef(kf, SIMULATED_CUSTOMER)),
        push_tap=push_tap,
        merged_count=merged_count,
    )


def build_try_chat(settings: Settings, open_kfid: str | None) -> TryChat:
    """The console's try-it chat: `simulate`'s parts over an in-memory WeCom, for the default app or a kf
    account's app."""
    kf = open_kfid or SIMULATED_KF
    channel = FakeKfChannel()
    parts = build_simulation(settings, channel=channel, kf=kf)
    customer = CustomerRef(kf, SIMULATED_CUSTOMER)
    own = [r.dify_api_base for r in settings.kf_routes if r.open_kfid == kf and r.dify_api_base]

    def event_menus() -> list[EventMessage]:
        return [(e.text, e.menu) for e in channel.world.sent_on_event if e.customer == customer and e.menu]

    return ConsoleTryChat(
        parts,
        enter_session=partial(channel.world.add_enter_session, kf, SIMULATED_CUSTOMER),
        event_menus=event_menus,
        app_label=own[0] if own else settings.dify_api_base,
    )


def seed_simulated_customer(
    channel: FakeKfChannel, *, kf: str = SIMULATED_KF, scene: str, scene_param: str, nickname: str
) -> None:
    """The simulated customer's profile and, when given, the entry they came from (as WeCom would tell)."""
    channel.world.add_customer_profile(SIMULATED_CUSTOMER, nickname=nickname or "模拟客户")
    if scene or scene_param:
        channel.world.add_enter_session(
            kf, SIMULATED_CUSTOMER, scene=scene, scene_param=quote(scene_param), welcome=False
        )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if args.command == "check":
        from adapters.inbound.cli_check import run_check

        # Quiet: the report is the output; adapters' own error logs would only repeat it.
        configure_logging(level="CRITICAL", fmt="text")
        checked, problems, source = load_for_check(args.config, env)
        return run_check(
            checked,
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

    configure_logging(level="ERROR", fmt="text", secrets=settings.secrets())
    parts = build_simulation(settings, scene=args.scene, scene_param=args.scene_param, nickname=args.nickname)
    return run_parts(
        parts,
        stdin=sys.stdin,
        stdout=sys.stdout,
        reset_words=build_options(settings).reset_words,
        entry_note=entry_note(args.scene, args.scene_param, args.nickname),
        merge_window_s=build_options(settings).merge_window_s,
    )


if __name__ == "__main__":
    raise SystemExit(main())
