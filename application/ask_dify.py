"""Ask the route's Dify app one question within the customer's conversation.

How many calls run at once toward each Dify app is learnt by the adaptive limiter
(application/concurrency.py): waiting customers are served in turns, and an app that refuses (429, 503)
makes the limit shrink. A refused request is asked again with backoff while the answer's deadline allows
(application/dify_retry.py); other retryable failures get `dify_retries` more tries; a timed-out one is
never asked again (the customer already waited the whole time). An exhausted quota is reported once per
episode and not asked again during its cooldown. A new conversation is started when Dify lost the old one
(once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from application import telemetry as t
from application.app_inputs import AppInputs
from application.concurrency import AdaptiveLimiter, LimiterSettings, Slot
from application.conversation_names import ConversationNamer
from application.dify_retry import RetryPolicy, RetrySettings, is_quota_exhausted, overload_of
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

# A refusal (429, 503) is asked again while the deadline allows; this only bounds a pathological loop.
OVERLOAD_ATTEMPTS = 64
# Dify refuses an app's excess calls at once (its concurrency check runs before the answer starts,
# docs/dify.md §8.1). A call not refused within this long counts as accepted, so the limiter's slow start
# grows while answers are still being produced even when the engine reports acceptance only with the whole
# answer (blocking mode, gateways that buffer the response head). 0.1 s covers a refusal's round trip within
# a region; a Dify farther away may be presumed too early, which costs one more doubling before its first
# 429 shrinks the limit (the refused calls are asked again, first in line). Slow start takes this long per
# doubling: 32 to 1,000 calls in about half a second.
PRESUMED_ACCEPTED_S = 0.1


@dataclass(frozen=True, slots=True)
class Asked:
    answer: Answer
    elapsed: float


def limiter_settings(options: BotOptions) -> LimiterSettings:
    """`[BOT] DIFY_CONCURRENCY` is the ceiling of the adaptive limit, `DIFY_MIN_CONCURRENCY` its floor."""
    return LimiterSettings.from_config(
        concurrency=options.dify_concurrency, min_concurrency=options.dify_min_concurrency
    )


def retry_settings(options: BotOptions) -> RetrySettings:
    """`dify_retries` more tries for ordinary transient failures; refusals until the deadline."""
    return RetrySettings(
        max_attempts=max(options.dify_retries, 0) + 1,
        overload_max_attempts=OVERLOAD_ATTEMPTS,
        base_delay_s=max(options.dify_retry_delay_s, 0.0),
    )


class _Progress:
    """Tells the limiter when Dify took the request (slow start grows on it), and passes everything on."""

    __slots__ = ("_slot", "_outer")

    def __init__(self, slot: Slot, outer: AnswerProgress | None) -> None:
        self._slot = slot
        self._outer = outer

    def accepted(self) -> None:
        self._slot.accepted()
        if self._outer is not None:
            self._outer.accepted()

    def streamed(self, text: str) -> None:
        if self._outer is not None:
            self._outer.streamed(text)


class AskDify:
    """The question in, Dify's answer out; raises ChatEngineError when no answer could be had in time."""

    def __init__(
        self,
        *,
        conversations: ConversationStore,
        clock: Clock,
        options: BotOptions,
        telemetry: Telemetry,
        inputs: AppInputs | None = None,
        namer: ConversationNamer | None = None,
        limiter: AdaptiveLimiter | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`inputs`: fills the app's declared variables (else `options.inputs` only); `namer`: names each
        conversation Dify starts."""
        self._inputs = inputs
        self._namer = namer
        self._conversations = conversations
        self._clock = clock
        self._options = options
        self._telemetry = telemetry
        self._limiter = limiter or AdaptiveLimiter(clock=clock, settings=limiter_settings(options))
        self._retry = retry or RetryPolicy(clock=clock, settings=retry_settings(options))
        self._sleep = sleep

    @property
    def limiter(self) -> AdaptiveLimiter:
        return self._limiter

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
        app_key = route.dify_app or route.name
        deadline = self._clock.now() + self._options.dify_deadline_s
        if self._retry.quota_blocked(app_key):
            self._telemetry.count_labelled("dify_errors", "quota_exhausted")
            raise ChatEngineError(
                "quota_exhausted", "the Dify app's quota is used up; not asking until it resets"
            )
        idle = self._options.conversation_idle_ttl_s
        conversation = await self._conversations.get_conversation(customer)
        conversation_id = current_conversation_id(conversation, now=self._clock.now(), idle_ttl_s=idle)
        restarted = False
        attempt = 0
        asked: Asked | None = None
        inputs = await self._inputs.for_message(message, route) if self._inputs is not None else None
        while asked is None:
            attempt += 1
            question = self._question(message, prepared, conversation_id, inputs)
            result = await self._attempt(
                question, route, app_key, customer, deadline, progress, retry=attempt > 1
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
                attempt -= 1  # a restart is not a retry
            elif progress_committed(progress):
                raise result  # part of the answer is out: another attempt would show a second answer
            else:
                await self._after_failure(result, attempt, deadline, app_key)
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

    async def _after_failure(
        self, error: ChatEngineError, attempt: int, deadline: float, app_key: str
    ) -> None:
        """Wait before the next attempt, or raise `error` when there is none."""
        decision = self._retry.decide(
            error, attempt=attempt, deadline=deadline, retry_after=error.retry_after_s, app_key=app_key
        )
        if decision.quota_exhausted:
            if decision.report_quota:
                self._telemetry.count("dify_quota_exhausted")
                log.error(
                    "Dify app %s: quota exhausted (%s: %s); customers get the fallback text and the app is "
                    "not asked again for %g s",
                    app_key,
                    error.code,
                    error.message[:200],
                    self._retry.settings.quota_cooldown_s,
                )
            raise error
        if not decision.retry:
            raise error
        self._telemetry.count_labelled("dify_retries", decision.reason or error.code)
        log.info("dify %s (attempt %d): asking again in %.1f s", error.code, attempt, decision.delay_s)
        if decision.delay_s > 0:
            await self._sleep(decision.delay_s)

    async def _attempt(
        self,
        question: Question,
        route: KfRoute,
        app_key: str,
        customer: CustomerRef,
        deadline: float,
        progress: AnswerProgress | None,
        *,
        retry: bool = False,
    ) -> Asked | ChatEngineError:
        """One call to Dify within the deadline: its answer, or the failure (counted) for the loop. Once part
        of the answer went out (progressive replies), a failure is final: asking again would show another."""
        started = time.monotonic()
        remaining = deadline - self._clock.now()
        if remaining <= 0:
            return ChatEngineError("timeout", "no answer before the deadline", retryable=False)
        try:
            async with asyncio.timeout(remaining):
                async with self._limiter.slot(app_key, customer, retry=retry) as slot:
                    asking = time.monotonic()
                    log.info("asking dify conversation=%s", question.conversation_id or "new")
                    presumed = asyncio.get_running_loop().call_later(PRESUMED_ACCEPTED_S, slot.accepted)
                    try:
                        answer = await route.engine.ask(question, _Progress(slot, progress))
                    except ChatEngineError as exc:
                        slot.record(exc)
                        raise
                    finally:
                        presumed.cancel()
                    slot.success(time.monotonic() - asking)
        except TimeoutError:
            self._telemetry.observe(t.DIFY, time.monotonic() - started)
            self._telemetry.count_labelled("dify_errors", "deadline")
            return ChatEngineError("timeout", "no answer before the deadline", retryable=False)
        except ConversationGone as gone:
            return _final(gone) if progress_committed(progress) else gone
        except ChatEngineError as exc:
            if progress_committed(progress):
                exc = _final(exc)
            self._telemetry.observe(t.DIFY, time.monotonic() - started)
            self._telemetry.count_labelled("dify_errors", exc.code)
            kind = overload_of(exc)
            if kind is not None:
                self._telemetry.count_labelled("dify_overloads", kind.value)
            reachable = exc.code not in ("unreachable",) or is_quota_exhausted(exc)
            self._telemetry.reachability("dify", reachable, exc.code)
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
