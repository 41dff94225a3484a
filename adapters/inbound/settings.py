"""The operator's settings (config_file.Settings) mapped onto what the application core takes: options, reply
texts, routes, the rate-limit rule, the notes logged at start.

Pure mapping, no adapters: bootstrap.py passes in what it builds (the Dify engines) and wires the results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from adapters.inbound.config_file import Settings
from application.concurrency import dify_app_key
from application.options import BotOptions, ReplyTexts
from application.ports import ChatEngine
from application.routing import KfRoute, Routing
from domain.rate_limit import RateLimit

# Builds the chat engine of a kf account whose Dify app is not the default one: (api_base, api_key) → engine.
EngineFactory = Callable[[str, str], ChatEngine]


def build_options(settings: Settings) -> BotOptions:
    """[BOT] and [TEXTS] as the core's options; empty lists keep the defaults."""
    defaults = BotOptions()
    return BotOptions(
        texts=build_texts(settings.texts),
        reset_words=settings.reset_words or defaults.reset_words,
        handoff_words=settings.handoff_words or defaults.handoff_words,
        max_message_age_s=settings.max_message_age_s,
        conversation_idle_ttl_s=settings.conversation_idle_ttl_s,
        dify_concurrency=settings.dify_concurrency,
        dify_retries=settings.dify_retries,
        inputs=dict(settings.dify_inputs),
        interim_after_s=settings.interim_after_s,
        handoff_markers=settings.handoff_markers or defaults.handoff_markers,
        session_state_ttl_s=settings.session_state_ttl_s,
        rate_limit=settings.rate_limit,
        rate_limit_window_s=settings.rate_limit_window_s,
        recovery_interval_s=settings.recovery_interval_s,
        message_lease_s=settings.message_lease_s,
        pull_lease_s=settings.pull_lease_s,
        image_text_window_s=settings.image_text_window_s,
        suggestions=settings.suggestions,
        feedback_window_s=settings.feedback_window_s,
        handoff_feedback=settings.handoff_feedback,
        merge_window_s=settings.merge_window_s,
        dify_min_concurrency=settings.dify_min_concurrency,
        dify_deadline_s=settings.dify_total_timeout_s,
    )


def build_texts(overrides: Mapping[str, str], base: ReplyTexts | None = None) -> ReplyTexts:
    """`base` (default: the built-in Chinese texts) with the configured texts; unknown names are ignored."""
    base = base or ReplyTexts()
    values = {name: getattr(base, name) for name in ReplyTexts.__dataclass_fields__}
    # Config files cannot hold a leading newline; "\n" written literally is one.
    values.update({k: v.replace("\\n", "\n") for k, v in overrides.items() if k in values})
    return ReplyTexts(**values)


def build_routing(
    settings: Settings, default_engine: ChatEngine, options: BotOptions, engine_for: EngineFactory
) -> Routing:
    """One route per [KF:<open_kfid>] section: its own texts, servicer and, when it names another Dify app,
    its own engine (`engine_for`); the default route for every other account."""
    default_app = dify_app_key(settings.dify_api_base, settings.dify_api_key)
    default = KfRoute(
        "default", default_engine, options.texts, settings.servicer_userid, dify_app=default_app
    )
    routes: dict[str, KfRoute] = {}
    for route in settings.kf_routes:
        base = route.dify_api_base or settings.dify_api_base
        same_app = base == settings.dify_api_base and route.dify_api_key == settings.dify_api_key
        routes[route.open_kfid] = KfRoute(
            route.open_kfid,
            default_engine if same_app else engine_for(base, route.dify_api_key or settings.dify_api_key),
            build_texts(route.texts, options.texts),
            route.servicer_userid or settings.servicer_userid,
            dify_app=default_app
            if same_app
            else dify_app_key(base, route.dify_api_key or settings.dify_api_key),
        )
    return Routing(default=default, routes=routes)


def rate_limit_rule(options: BotOptions) -> RateLimit:
    return RateLimit(options.rate_limit, options.rate_limit_window_s)


def configured_kfs(settings: Settings) -> list[str]:
    """The kf accounts the configuration names (the admin API lists them even before any customer wrote)."""
    return [route.open_kfid for route in settings.kf_routes]


def start_notes(settings: Settings, store_backend: str, version: str) -> list[tuple[int, str]]:
    """(level, message) lines logged once the service accepts callbacks."""
    notes = [(logging.INFO, f"kf-dify {version} listening on {settings.host}:{settings.port}")]
    if store_backend == "memory":
        notes.append(
            (
                logging.WARNING,
                "state store: in-process memory: state is lost on restart and not shared between instances "
                "(configure [MEMCACHE] for production)",
            )
        )
    else:
        servers = settings.memcache.servers if settings.memcache else ""
        notes.append((logging.INFO, f"state store: memcached {servers}"))
    if not settings.admin_token:
        notes.append((logging.WARNING, "ADMIN_TOKEN is not set: the admin endpoints refuse every request"))
    return notes
