"""Small pure helpers the composition root (bootstrap.py) wires with; none knows a concrete adapter."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from application.lifecycle import Lifecycle
from application.ports import Clock
from application.routing import Routing


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
