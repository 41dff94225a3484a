"""Small pure helpers the composition root (bootstrap.py) wires with; none knows a concrete adapter."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from application.app_inputs import AppInputs
from application.concurrency import AdaptiveLimiter
from application.insights import Insights
from application.lifecycle import Lifecycle
from application.options import BotOptions
from application.ports import Clock, StateStore
from application.routing import Routing
from application.telemetry import Telemetry


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


def merged_sections(*sections: Callable[[], Mapping[str, Any]]) -> Callable[[], dict[str, Any]]:
    """One `extra` section provider for /status from several (the console's windows, the Dify limiter)."""

    def merged() -> dict[str, Any]:
        combined: dict[str, Any] = {}
        for section in sections:
            combined.update(section())
        return combined

    return merged


def shared_with_instances(store: StateStore) -> StateStore | None:
    """The store, when several instances share it (Memcached): then the rate limit, session owners and
    refusals are shared through it. None for the in-process store: those stay in this instance's memory."""
    return store if is_persistent(store.backend) else None


def drains_per_instance(options: BotOptions, store_backend: str) -> int:
    """Customers one instance drains at once when instances share the store: as many as it may ask Dify at
    once, so a burst pulled by one instance is left for the others beyond that (0: no limit, one instance)."""
    return options.dify_concurrency if is_persistent(store_backend) else 0


def room_when_shared(limiter: AdaptiveLimiter, store_backend: str) -> AdaptiveLimiter | None:
    """With instances sharing the store, one takes more customers only while its Dify limiter has room, so a
    burst spreads over all of them; a single instance (in-process store) drains everything it pulls."""
    return limiter if is_persistent(store_backend) else None


def start_then_report(
    start: Callable[[], Awaitable[None]], app_inputs: AppInputs, routing: Routing
) -> Callable[[], Awaitable[None]]:
    """The lifecycle's start, then (in the background) the report of required app variables nobody fills."""

    async def started() -> None:
        await start()
        app_inputs.start_report(routing)

    return started


def build_insights(telemetry: Telemetry, instance: str) -> Insights:
    """The console's per-instance history, fed by every counted event (application/insights.py)."""
    insights = Insights(instance=instance)
    telemetry.listeners.append(insights)
    return insights
