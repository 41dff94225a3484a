"""The operator's use cases: look up, reset and clear conversations; report status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from application.ports import StateStore
from application.telemetry import Telemetry
from domain.conversation import Conversation
from domain.messages import CustomerRef

log = logging.getLogger("kfdify.admin")


@dataclass(frozen=True, slots=True)
class FoundConversation:
    customer: CustomerRef
    conversation: Conversation

    def to_dict(self) -> dict[str, Any]:
        return {"open_kfid": self.customer.open_kfid, **self.conversation.to_dict()}


class ConversationAdmin:
    """Conversations are kept per kf account and customer; `open_kfid` narrows a lookup to one account."""

    def __init__(self, *, store: StateStore, configured_kfs: Iterable[str] = ()) -> None:
        self._store = store
        self._configured = tuple(configured_kfs)

    async def _kfs(self, open_kfid: str | None) -> list[str]:
        if open_kfid:
            return [open_kfid]
        known = await self._store.known_kfs()
        return list(dict.fromkeys([*known, *self._configured]))

    async def find(self, user_id: str, open_kfid: str | None = None) -> list[FoundConversation]:
        found = []
        for kf in await self._kfs(open_kfid):
            customer = CustomerRef(kf, user_id)
            conversation = await self._store.get_conversation(customer)
            if conversation is not None:
                found.append(FoundConversation(customer, conversation))
        found.sort(key=lambda f: f.conversation.last_active_at, reverse=True)
        return found

    async def reset(self, user_id: str, open_kfid: str | None = None) -> int:
        count = 0
        for kf in await self._kfs(open_kfid):
            if await self._store.delete_conversation(CustomerRef(kf, user_id)):
                count += 1
        if count:
            log.info("admin reset %d conversation(s) of customer=%s", count, user_id)
        return count

    async def clear(self) -> None:
        await self._store.clear()
        log.warning("admin cleared all conversations, dedupe marks and cursors")


class StatusReport:
    def __init__(
        self,
        *,
        store: StateStore,
        telemetry: Telemetry,
        version: str,
        extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self._store = store
        self._telemetry = telemetry
        self._version = version
        self._extra = extra

    async def __call__(self) -> dict[str, Any]:
        tm = self._telemetry
        reachable = await self._store.ping()
        counters = dict(sorted(tm.counters.items()))
        return {
            "status": "ok" if reachable else "degraded",
            "version": self._version,
            "uptime_s": round(time.time() - tm.started_at, 1),
            "store": {
                "backend": self._store.backend,
                "reachable": reachable,
                "degraded": bool(getattr(self._store, "degraded", False)),
            },
            "dependencies": {name: dict(seen) for name, seen in sorted(tm.last_seen.items())},
            "counters": counters,
            "dify_errors": dict(tm.labelled.get("dify_errors", {})),
            "wecom_errors": dict(tm.labelled.get("wecom_errors", {})),
            "events": dict(tm.labelled.get("events", {})),
            "latency_s": {
                name: {**tm.percentiles(name), "count": tm.series[name].count} for name in sorted(tm.series)
            },
            "in_flight": tm.in_flight,
            "known_kfs": await self._store.known_kfs(),
            **self._extra(),
        }

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        reachable = await self._store.ping()
        return reachable, {"store": self._store.backend, "store_reachable": reachable, "config": "loaded"}
