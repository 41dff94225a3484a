"""Ask the route's Dify app one question within the customer's conversation.

Bounded concurrency (`dify_concurrency`), a new conversation when Dify lost the old one (once), and a few
retries for transient failures, never after a timeout (the customer already waited the whole time).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from application import telemetry as t
from application.app_inputs import AppInputs
from application.conversation_names import ConversationNamer
from application.errors import ChatEngineError, ConversationGone
from application.media_port import PreparedQuestion
from application.options import BotOptions
from application.ports import AnswerProgress, Clock, ConversationStore
from application.progressive import progress_committed
from application.routing import KfRoute
from application.telemetry import Telemetry
from domain.chat import Answer, Question
from domain.conversation import after_answer, current_conversation_id, with_last_answer
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger("kfdify.answer")

# Failures where asking again would make the customer wait a second time as long.
_NOT_RETRIED = frozenset({"timeout", "idle_timeout"})


@dataclass(frozen=True, slots=True)
class Asked:
    answer: Answer
    elapsed: float


class AskDify:
    """The question in, Dify's answer out; raises ChatEngineError when no answer could be had."""

    def __init__(
        self,
        *,
        conversations: ConversationStore,
        clock: Clock,
        options: BotOptions,
        telemetry: Telemetry,
        inputs: AppInputs | None = None,
        namer: ConversationNamer | None = None,
    ) -> None:
        """`inputs`: fills the app's declared variables (else `options.inputs` only); `namer`: names each
        conversation Dify starts."""
        self._inputs = inputs
        self._namer = namer
        self._conversations = conversations
        self._clock = clock
        self._options = options
        self._telemetry = telemetry
        self._slots = asyncio.Semaphore(max(options.dify_concurrency, 1))

    async def __call__(
        self,
        message: InboundMessage,
        route: KfRoute,
        prepared: PreparedQuestion,
        *,
        progress: AnswerProgress | None = None,
    ) -> Asked:
        """`progress` hears the answer as it streams (progressive replies)."""
        customer = message.customer
        idle = self._options.conversation_idle_ttl_s
        conversation = await self._conversations.get_conversation(customer)
        conversation_id = current_conversation_id(conversation, now=self._clock.now(), idle_ttl_s=idle)
        retries_left = max(self._options.dify_retries, 0)
        restarted = False
        asked: Asked | None = None
        inputs = await self._inputs.for_message(message, route) if self._inputs is not None else None
        while asked is None:
            result = await self._attempt(
                self._question(message, prepared, conversation_id, inputs), route, progress
            )
            if isinstance(result, Asked):
                asked = result
            elif isinstance(result, ConversationGone):
                if conversation_id is None or restarted:
                    raise ChatEngineError("conversation_gone", "Dify refused a new conversation") from None
                log.info("dify conversation gone, starting a new one")
                self._telemetry.count("conversations_restarted")
                await self._conversations.delete_conversation(customer)
                conversation, conversation_id, restarted = None, None, True
            elif result.retryable and retries_left > 0 and result.code not in _NOT_RETRIED:
                retries_left -= 1
                await asyncio.sleep(self._options.dify_retry_delay_s * (1 + random.random()))
            else:
                raise result
        updated = after_answer(
            conversation, conversation_id=asked.answer.conversation_id, now=self._clock.now(), idle_ttl_s=idle
        )
        updated = with_last_answer(updated, message_id=asked.answer.message_id, now=self._clock.now())
        if asked.answer.conversation_id:
            await self._conversations.put_conversation(customer, updated)
        if self._namer is not None and conversation_id is None:  # Dify started this conversation now
            self._namer.started(message, route, asked.answer)
        return asked

    async def forget(self, customer: CustomerRef) -> bool:
        """Start the customer's next question in a new conversation (a reset); True when there was one."""
        return await self._conversations.delete_conversation(customer)

    async def _attempt(
        self, question: Question, route: KfRoute, progress: AnswerProgress | None = None
    ) -> Asked | ChatEngineError:
        """One call to Dify: its answer, or the failure (counted) for the loop to decide about. Once part of
        the answer went out (progressive replies), a failure is final: asking again would show another."""
        started = time.monotonic()
        try:
            async with self._slots:
                log.info("asking dify conversation=%s", question.conversation_id or "new")
                answer = await route.engine.ask(question, progress)
        except ConversationGone as gone:
            return _final(gone) if progress_committed(progress) else gone
        except ChatEngineError as exc:
            if progress_committed(progress):
                exc = _final(exc)
            self._telemetry.observe(t.DIFY, time.monotonic() - started)
            self._telemetry.count_labelled("dify_errors", exc.code)
            self._telemetry.reachability("dify", exc.code not in ("unreachable",), exc.code)
            return exc
        elapsed = time.monotonic() - started
        self._telemetry.observe(t.DIFY, elapsed)
        self._telemetry.reachability("dify", True)
        log.info("dify answered chars=%d in %.0f ms", len(answer.text), elapsed * 1000)
        return Asked(answer, elapsed)

    def _question(
        self,
        message: InboundMessage,
        prepared: PreparedQuestion,
        conversation_id: str | None,
        inputs: Mapping[str, Any] | None = None,
    ) -> Question:
        return Question(
            user=message.customer.dify_user(),
            query=prepared.query,
            conversation_id=conversation_id,
            inputs=dict(inputs) if inputs is not None else dict(self._options.inputs),
            files=prepared.files,
            trace_id=trace_id(message),
        )


def _final(error: ChatEngineError) -> ChatEngineError:
    """`error` as a failure not worth another attempt (part of the answer was already shown)."""
    return ChatEngineError(error.code, error.message, status=error.status, retryable=False)


def trace_id(message: InboundMessage) -> str:
    """Dify's X-Trace-Id allows [A-Za-z0-9_-]{1,128}; the WeCom msgid ties the two logs together."""
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_" for ch in message.msgid)[:128]
