"""Conversations an operator can find: each new Dify conversation is named after the customer
(`[TEXTS] conversation_name`, default `微信客户 {nickname}`), so Dify's log view lists customers by name.

Naming happens in the background after the answer (`POST /conversations/{id}/name`, docs/dify.md): it never
delays or changes an answer, and a failure is only logged.
"""

from __future__ import annotations

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

    def started(self, message: InboundMessage, route: KfRoute, answer: Answer) -> None:
        """Dify started a conversation with this answer: name it (in the background)."""
        if not answer.conversation_id or not route.texts.conversation_name:
            return
        self._background.start(self._name(message, route, answer.conversation_id))

    async def _name(self, message: InboundMessage, route: KfRoute, conversation_id: str) -> None:
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
            log.info("conversation not named (%s): the answer went out anyway", exc.code)
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
