"""Handoffs teach the operator: a customer who asks for a human (a handoff word) within `FEEDBACK_WINDOW`
seconds of a bot answer marks that answer `dislike` in Dify (`POST /messages/{id}/feedbacks`, docs/dify.md),
with a note saying so and the customer's words, so Dify's logs show which answers made customers give up.

A marker-triggered handoff (the app's own decision) records nothing. Recording happens in the background
and never affects the handoff; each answer is marked at most once.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from application.background import BackgroundTasks
from application.errors import ChatEngineError
from application.ports import Clock, ConversationStore
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.customer import clean_text
from domain.messages import InboundMessage

log = logging.getLogger("kfdify.feedback")

RATING = "dislike"
# The note Dify shows with the feedback; {words}: what the customer wrote.
NOTE = "客户在这条回答之后立即要求转人工（客户原话：{words}）"
_MAX_WORDS_BYTES = 300


class HandoffFeedback:
    def __init__(
        self,
        *,
        conversations: ConversationStore,
        clock: Clock,
        telemetry: Telemetry,
        window_s: float = 600.0,
        enabled: bool = True,
    ) -> None:
        self._conversations = conversations
        self._clock = clock
        self._telemetry = telemetry
        self._window_s = window_s
        self._enabled = enabled
        self._background = BackgroundTasks()

    def customer_asked_for_human(self, message: InboundMessage, route: KfRoute) -> None:
        """The customer typed a handoff word: mark the bot's last answer, if it was recent (background)."""
        if not self._enabled or self._window_s <= 0:
            return
        self._background.start(self._record(message, route))

    async def _record(self, message: InboundMessage, route: KfRoute) -> None:
        customer = message.customer
        try:
            conversation = await self._conversations.get_conversation(customer)
            if conversation is None or not conversation.last_message_id:
                return
            if self._clock.now() - conversation.last_answer_at > self._window_s:
                return
            # Marked once: the next handoff word finds no answer to mark.
            await self._conversations.put_conversation(customer, replace(conversation, last_message_id=""))
            words = clean_text(message.text, max_bytes=_MAX_WORDS_BYTES)
            await route.engine.give_feedback(
                conversation.last_message_id,
                user=customer.dify_user(),
                rating=RATING,
                content=NOTE.format(words=words),
            )
        except ChatEngineError as exc:
            self._telemetry.count_labelled("dify_errors", exc.code)
            log.info("handoff feedback not recorded (%s)", exc.code)
            return
        except Exception:
            log.exception("recording handoff feedback failed unexpectedly")
            return
        self._telemetry.count("feedback_recorded")
        log.info("recorded dislike feedback: the customer asked for a human right after the answer")

    async def idle(self) -> None:
        """Wait until everything started has finished (tests)."""
        await self._background.idle()

    async def aclose(self) -> None:
        await self._background.aclose()
