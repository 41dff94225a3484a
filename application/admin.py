"""The operator's use cases: look up, reset and clear conversations; report status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from application.ports import ConversationStore, KfRegistry, ProfileStore, StoreAdmin
from application.telemetry import Telemetry
from domain.conversation import Conversation
from domain.customer import CustomerProfile
from domain.messages import CustomerRef

log = logging.getLogger("kfdify.admin")


@dataclass(frozen=True, slots=True)
class FoundConversation:
    customer: CustomerRef
    conversation: Conversation
    # Who the customer is and where they came from (issue #17), when known.
    profile: CustomerProfile | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {"open_kfid": self.customer.open_kfid, **self.conversation.to_dict()}
        if self.profile is not None:
            found["profile"] = profile_view(self.profile)
        return found


def profile_view(profile: CustomerProfile) -> dict[str, Any]:
    """The profile as the operator sees it (admin token only: it holds the unionid)."""
    entry = profile.entry
    return {
        "nickname": profile.nickname,
        "gender": profile.gender_text,
        "unionid": profile.unionid,
        "fetched_at": profile.fetched_at,
        "entry": None
        if entry is None
        else {
            "scene": entry.scene,
            "scene_param": entry.scene_param,
            "channels_nickname": entry.channels_nickname,
            "channels_scene": entry.channels_scene,
            "at": entry.at,
        },
    }


class AdminStore(ConversationStore, KfRegistry, StoreAdmin, Protocol):
    """What the operator's use cases need of the state store."""


class ConversationAdmin:
    """Conversations are kept per kf account and customer; `open_kfid` narrows a lookup to one account."""

    def __init__(
        self, *, store: AdminStore, configured_kfs: Iterable[str] = (), profiles: ProfileStore | None = None
    ) -> None:
        self._profiles = profiles
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
                profile = await self._profiles.get_profile(customer) if self._profiles is not None else None
                found.append(FoundConversation(customer, conversation, profile))
        found.sort(key=lambda f: f.conversation.last_active_at, reverse=True)
        return found

    async def reset(self, user_id: str, open_kfid: str | None = None) -> int:
        """Forget the customer's Dify conversation: their next message starts a new one. Nothing else changes,
        so no message answered before is answered again."""
        count = 0
        for kf in await self._kfs(open_kfid):
            if await self._store.delete_conversation(CustomerRef(kf, user_id)):
                count += 1
        if count:
            log.info("admin reset %d conversation(s) of customer=%s", count, user_id)
        return count

    async def clear(self) -> None:
        """Start every conversation over: the store forgets conversations, inboxes, cursors, pull requests and
        known kf accounts, but keeps the DONE marks and leases (`StoreAdmin.clear`).

        Why keep the marks: the next pull of each kf account runs without cursor and WeCom hands back up to
        three days of history. With the marks, every message answered before the clear reads DONE and is
        neither sent to Dify nor answered again, whichever instance pulls and whether or not the service
        restarted; messages pulled but not yet answered come back with that history and are still answered
        (within MAX_MESSAGE_AGE); messages arriving afterwards are answered as usual. A clear watermark time
        was the alternative: it would also drop unanswered messages sent just before the clear, and depend on
        WeCom's and our clocks agreeing."""
        await self._store.clear()
        log.warning("admin cleared all conversations, inboxes and cursors (answered messages stay answered)")


class StatusStore(KfRegistry, StoreAdmin, Protocol):
    """What /status and /ready need of the state store."""


class StatusReport:
    def __init__(
        self,
        *,
        store: StatusStore,
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
