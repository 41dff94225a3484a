"""Suggested questions after an answer: the AI app's follow-ups, offered as a menu the customer can tap.

When the Dify app has "suggested questions after answer" on (`/parameters`), its questions for the answer
(`GET /messages/{id}/suggested`, docs/dify.md) go out as a `msgmenu` of click items (docs/wecom-kf.md §6.3)
after the answer and its files, only if the customer message's quota has a message left: never at the cost of
answer text. A tapped item comes back as a text carrying the item's `menu_id` and is answered like any text.
Fetching or sending the menu may fail: the answer is already out, so that costs only the menu.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence

from application.app_parameters import AppParametersCache
from application.errors import ChatEngineError
from application.options import BotOptions
from application.reply_session import ReplySession
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.chat import Answer
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import InboundMessage

log = logging.getLogger("kfdify.answer")

# WeCom's msgmenu limits (docs/wecom-kf.md §6.3): items, bytes per click item, bytes of the head.
MAX_MENU_ITEMS = 10
MAX_ITEM_BYTES = 128
MAX_HEAD_BYTES = 1024
# The answer is out already: the menu is not worth holding the customer's next message longer than this.
SUGGESTIONS_DEADLINE_S = 10.0
# The ids of the items we send: "sq<n>_" and 12 hex characters of the answered message's reply msgid.
_ITEM_ID = re.compile(r"sq\d_[0-9a-f]{12}")


def menu_items(message: InboundMessage, questions: Sequence[str]) -> list[tuple[str, str]]:
    """The (id, content) click items for `questions`: blank and repeated ones dropped, each cut to 128 bytes
    on a character boundary, at most 10; ids derived from the customer message."""
    digest = outbound_msgid(DedupeKey.for_message(message), 0)[:12]
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    for question in questions:
        content = _fit(" ".join(question.split()), MAX_ITEM_BYTES)
        if not content or content in seen:
            continue
        seen.add(content)
        items.append((f"sq{len(items)}_{digest}", content))
        if len(items) == MAX_MENU_ITEMS:
            break
    return items


def is_suggestion_tap(message: InboundMessage) -> bool:
    """The text is a tapped item of a suggestion menu we sent."""
    return bool(message.menu_id) and _ITEM_ID.fullmatch(message.menu_id) is not None


class SuggestQuestions:
    """Offers the app's suggested questions after an answer, within what is left of the quota."""

    def __init__(self, *, parameters: AppParametersCache, options: BotOptions, telemetry: Telemetry) -> None:
        self._parameters = parameters
        self._options = options
        self._telemetry = telemetry

    async def offer(
        self, message: InboundMessage, route: KfRoute, replies: ReplySession, answer: Answer
    ) -> bool:
        """Send the menu for `answer` when the app and the quota allow; True when it went out."""
        if not self._options.suggestions or not answer.message_id:
            return False
        if replies.remaining < 1 or replies.human_owns_session:
            return False
        try:
            parameters = await self._parameters.get(route)
            if not parameters.suggestions_after_answer:
                return False
            async with asyncio.timeout(SUGGESTIONS_DEADLINE_S):
                questions = await route.engine.suggested(message.customer.dify_user(), answer.message_id)
        except TimeoutError:
            self._telemetry.count_labelled("suggestion_errors", "timeout")
            log.info("no suggested questions: timeout")
            return False
        except ChatEngineError as exc:
            self._telemetry.count_labelled("suggestion_errors", exc.code)
            log.info("no suggested questions: %s", exc.code)
            return False
        items = menu_items(message, questions)
        if not items or replies.remaining < 1:
            return False
        if not await replies.send_menu(_fit(route.texts.suggestions_head, MAX_HEAD_BYTES), items):
            return False
        self._telemetry.count("suggestion_menus_sent")
        log.info("suggested questions sent items=%d", len(items))
        return True


def _fit(text: str, max_bytes: int) -> str:
    return text.strip().encode("utf-8")[:max_bytes].decode("utf-8", "ignore").strip()
