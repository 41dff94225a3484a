"""Conversations an operator can find: each new Dify conversation is named after the customer
(`[TEXTS] conversation_name`, default `微信客户 {nickname}`), so Dify's log view lists customers by name.

Naming happens in the background after the answer (`POST /conversations/{id}/name`, docs/dify.md): it never
delays or changes an answer, and a failure is only logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from application.background import BackgroundTasks
from application.customer_profile import ProfileBook
from application.errors import ChatEngineError
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.chat import Answer
from domain.customer import CustomerProfile, clean_text
from domain.messages import InboundMessage

log = logging.getLogger("kfdify.names")

# Dify keeps conversation names short; longer ones are cut.
MAX_NAME_CHARS = 64
# Namings under way at once. Naming is background work: during a burst of new conversations it must not take
# the event loop's time from answers (each naming is a Dify round trip), so the rest wait their turn.
MAX_NAMINGS_AT_ONCE = 4
# Namings waiting or under way: beyond this (Dify names slower than conversations start), new conversations
# stay unnamed (counted as `conversations_not_named`) rather than piling up in memory.
MAX_NAMINGS_PENDING = 10_000


def conversation_name(template: str, message: InboundMessage, profile: CustomerProfile | None) -> str:
    """The name for the customer's conversation ("" = none). Unknown placeholders stay as written."""
    if not template:
        return ""
    nickname = profile.nickname if profile is not None and profile.nickname else message.external_userid
    values: Mapping[str, str] = {
        "nickname": nickname,
        "external_userid": message.external_userid,
        "open_kfid": message.open_kfid,
        "scene": profile.entry.scene if profile is not None and profile.entry is not None else "",
    }
    try:
        name = template.format_map(_Defaulting(values))
    except (ValueError, IndexError, AttributeError):  # a malformed template: use it as written
        name = template
    return clean_text(name, max_bytes=4 * MAX_NAME_CHARS)[:MAX_NAME_CHARS]


class _Defaulting(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class ConversationNamer:
    def __init__(self, *, profiles: ProfileBook | None, telemetry: Telemetry) -> None:
        self._profiles = profiles
        self._telemetry = telemetry
        self._background = BackgroundTasks()
        self._slots = asyncio.Semaphore(MAX_NAMINGS_AT_ONCE)
        self._failures_logged: set[str] = set()

    def started(self, message: InboundMessage, route: KfRoute, answer: Answer) -> None:
        """Dify started a conversation with this answer: name it (in the background)."""
        if not answer.conversation_id or not route.texts.conversation_name:
            return
        if self._background.pending >= MAX_NAMINGS_PENDING:
            self._telemetry.count("conversations_not_named")
            return
        self._background.start(self._name(message, route, answer.conversation_id))

    async def _name(self, message: InboundMessage, route: KfRoute, conversation_id: str) -> None:
        async with self._slots:
            await self._name_now(message, route, conversation_id)

    async def _name_now(self, message: InboundMessage, route: KfRoute, conversation_id: str) -> None:
        profile = await self._profiles.lookup(message.customer) if self._profiles is not None else None
        name = conversation_name(route.texts.conversation_name, message, profile)
        if not name:
            return
        try:
            await route.engine.name_conversation(
                conversation_id, user=message.customer.dify_user(), name=name
            )
        except ChatEngineError as exc:
            self._telemetry.count_labelled("dify_errors", exc.code)
            # The same refusal for every conversation (an app that cannot be named) is logged once at INFO.
            level = logging.DEBUG if exc.code in self._failures_logged else logging.INFO
            self._failures_logged.add(exc.code)
            log.log(level, "conversation not named (%s): the answer went out anyway", exc.code)
            return
        except Exception:
            log.exception("naming the conversation failed unexpectedly")
            return
        self._telemetry.count("conversations_named")

    async def idle(self) -> None:
        """Wait until everything started has finished (tests)."""
        await self._background.idle()

    async def aclose(self) -> None:
        await self._background.aclose()
