"""Answer one customer message: session state, commands, handoff, fair use, the Dify question, and the
replies within WeCom's limits."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from application import telemetry as t
from application.errors import ChatEngineError, ConversationGone, WeComError
from application.handoff import HandOffToHuman
from application.options import BotOptions, ReplyTexts
from application.ports import Clock, ConversationStore, KfChannel
from application.rate_limiter import CustomerRateLimiter
from application.rejections import RejectedCustomers
from application.routing import KfRoute, Routing
from application.session_state import SessionStates
from application.telemetry import Telemetry
from domain.chat import Answer, Attachment, Question
from domain.commands import CommandKind, CommandSet
from domain.conversation import after_answer, current_conversation_id
from domain.dedupe import DedupeKey, outbound_msgid
from domain.handoff import take_handoff_marker
from domain.messages import InboundMessage, Kind
from domain.rate_limit import RateDecision
from domain.replies import MESSAGES_PER_CUSTOMER_MESSAGE, split_reply
from domain.session import SessionState, bot_may_answer

log = logging.getLogger("kfdify.answer")


class Outcome(StrEnum):
    ANSWERED = "answered"
    RESET = "reset"
    HANDOFF = "handoff"
    UNSUPPORTED = "unsupported"
    FALLBACK = "fallback"
    RATE_LIMITED = "rate_limited"  # over the customer's fair-use limit: one notice per window, no Dify
    SILENT = "silent"  # a human owns the session, or nothing could be sent


# Who has the session when the bot stays silent (for counters and logs).
_SILENT_OWNERS: dict[SessionState, str] = {SessionState.HUMAN: "human", SessionState.QUEUED: "queued"}


@dataclass(frozen=True, slots=True)
class PreparedQuestion:
    """What a non-text message becomes: a question for Dify (text + uploaded files), or a reply to send."""

    query: str = ""
    files: tuple[Attachment, ...] = ()
    reply: str = ""
    # The query is what the customer said (a voice transcript): answer it exactly as if typed.
    as_text: bool = False


class MediaPreparer(Protocol):
    """Turns images, voice and files into something Dify can answer (see application/media.py)."""

    async def prepare(self, message: InboundMessage, route: KfRoute) -> PreparedQuestion: ...

    async def attach(
        self,
        prepared: PreparedQuestion,
        attached: Sequence[InboundMessage],
        route: KfRoute,
        replies: ReplySession,
    ) -> PreparedQuestion:
        """The text's question plus the images sent just before it (failures are told, not raised)."""
        ...

    def reserved_slots(self, answer: Answer) -> int:
        """Reply messages the answer's files will need after its text."""
        ...

    async def deliver(self, answer: Answer, route: KfRoute, replies: ReplySession) -> None:
        """Send the answer's files (images as images, the rest as links) within the remaining quota."""
        ...


class ReplySession:
    """The replies to one customer message: at most 5, named after it so that a resend is a repeat."""

    def __init__(
        self,
        *,
        channel: KfChannel,
        message: InboundMessage,
        telemetry: Telemetry,
        options: BotOptions,
        quota: int = MESSAGES_PER_CUSTOMER_MESSAGE,
        sessions: SessionStates | None = None,
        retry: bool = True,
    ) -> None:
        self._channel = channel
        self._message = message
        self._key = DedupeKey.for_message(message)
        self._telemetry = telemetry
        self._options = options
        self._sessions = sessions
        self._retry = retry
        self.quota = quota
        self.used = 0
        self.delivered = 0
        self.human_owns_session = False

    @property
    def remaining(self) -> int:
        return self.quota - self.used

    async def send(self, text: str) -> bool:
        """Send one text (already within 2048 bytes). False when it could not be sent."""
        if not text.strip():
            return False
        return await self._deliver(
            "text",
            lambda msgid: self._channel.send_text(self._message.customer, text, msgid=msgid),
            size=len(text.encode()),
        )

    async def send_image(self, media_id: str) -> bool:
        """Send one image message (a `media/upload` media_id): the same quota and msgid scheme as texts."""
        if not media_id:
            return False
        return await self._deliver(
            "image", lambda msgid: self._channel.send_image(self._message.customer, media_id, msgid=msgid)
        )

    async def _deliver(self, kind: str, send: Callable[[str], Awaitable[object]], *, size: int = 0) -> bool:
        """One reply message within the quota, named `<digest>_<part>` after the customer's message, resent
        with the same name while WeCom is busy. False when it could not be sent."""
        if self.human_owns_session or self.remaining <= 0:
            return False
        part = self.used
        self.used += 1
        msgid = outbound_msgid(self._key, part)
        attempts = 1 + (max(self._options.send_retries, 0) if self._retry else 0)
        message = self._message
        for attempt in range(attempts):
            started = time.monotonic()
            try:
                await send(msgid)
            except WeComError as exc:
                self._telemetry.observe(t.SEND, time.monotonic() - started)
                if exc.errcode == WeComError.SESSION_NOT_SENDABLE:
                    # A human servicer owns the session (or the 48 h window closed): stay quiet, no error.
                    self.human_owns_session = True
                    self._telemetry.count("replies_suppressed_human")
                    if self._sessions is not None:
                        self._sessions.learn(message.customer, SessionState.HUMAN)
                    log.info(
                        "reply not sent: session is not the bot's (95018) kf=%s customer=%s msgid=%s",
                        message.open_kfid,
                        message.external_userid,
                        message.msgid,
                    )
                    return False
                self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
                if exc.is_transient and attempt + 1 < attempts:
                    # Same outbound msgid on the retry: WeCom refuses a repeat if the first one did land.
                    await asyncio.sleep(_backoff(self._options.send_retry_delay_s, attempt))
                    continue
                log.warning(
                    "%s reply part %d failed kf=%s customer=%s msgid=%s errcode=%s errmsg=%s",
                    kind,
                    part,
                    message.open_kfid,
                    message.external_userid,
                    message.msgid,
                    exc.errcode,
                    exc.errmsg,
                )
                return False
            elapsed = time.monotonic() - started
            self._telemetry.observe(t.SEND, elapsed)
            self._telemetry.count("replies_sent" if kind == "text" else f"{kind}_replies_sent")
            self._telemetry.reachability("wecom", True)
            self.delivered += 1
            if self._sessions is not None:
                # Sending through the API hands the session to the bot (spec §6.1).
                self._sessions.learn(message.customer, SessionState.BOT)
            log.info(
                "reply sent kf=%s customer=%s msgid=%s part=%d %s bytes=%d in %.0f ms",
                message.open_kfid,
                message.external_userid,
                message.msgid,
                part,
                kind,
                size,
                elapsed * 1000,
            )
            return True
        return False

    async def send_answer(self, text: str, texts: ReplyTexts, *, reserve: int = 0) -> int:
        """Split `text` into what the remaining quota allows, keeping `reserve` messages for what must
        follow; returns how many parts went out."""
        parts = split_reply(
            text, max_parts=max(self.remaining - reserve, 1), truncation_notice=texts.truncated
        )
        sent = 0
        for part in parts:
            if not await self.send(part):
                break
            sent += 1
        return sent


@dataclass(frozen=True, slots=True)
class _Asked:
    answer: Answer
    elapsed: float


class AnswerCustomerMessage:
    """One customer message in, the right replies out. Never raises for Dify or WeCom failures."""

    def __init__(
        self,
        *,
        conversations: ConversationStore,
        channel: KfChannel,
        routing: Routing,
        clock: Clock,
        options: BotOptions,
        telemetry: Telemetry,
        render: Callable[[str], str] = lambda text: text,
        media: MediaPreparer | None = None,
        sessions: SessionStates | None = None,
        handoff: HandOffToHuman | None = None,
        rate_limiter: CustomerRateLimiter | None = None,
        rejections: RejectedCustomers | None = None,
    ) -> None:
        self._conversations = conversations
        self._channel = channel
        self._routing = routing
        self._clock = clock
        self._options = options
        self._telemetry = telemetry
        self._render = render
        self._media = media
        self._sessions = sessions
        self._handoff = handoff
        self._rate_limiter = rate_limiter
        self._rejections = rejections
        self._commands = CommandSet.of(reset=options.reset_words, handoff=options.handoff_words)
        self._dify_slots = asyncio.Semaphore(max(options.dify_concurrency, 1))

    async def __call__(self, message: InboundMessage, *, attached: Sequence[InboundMessage] = ()) -> Outcome:
        """`attached`: images the customer sent just before this text, asked together with it (drain)."""
        route = self._routing.for_kf(message.open_kfid)
        # A customer who refused our messages gets no interim text and no resends, until they write again.
        refusing = self._rejections is not None and self._rejections.applies(
            message.customer, message_time=message.send_time
        )
        replies = ReplySession(
            channel=self._channel,
            message=message,
            telemetry=self._telemetry,
            options=self._options,
            sessions=self._sessions,
            retry=not refusing,
        )
        if self._sessions is not None:
            state = await self._sessions.state_for(message)
            if not bot_may_answer(state):
                return self._stay_silent(message, state)

        voice: PreparedQuestion | None = None
        if message.kind is Kind.VOICE and self._media is not None:
            voice = await self._media.prepare(message, route)
            if voice.as_text:  # the transcript is answered exactly as if typed, commands included
                message = replace(message, msgtype=Kind.TEXT.value, text=voice.query)

        command = self._commands.parse(message.text) if message.kind is Kind.TEXT else None
        if command is not None and command.kind is CommandKind.HANDOFF and self._handoff is not None:
            await self._handoff(message, route, replies, trigger="keyword")
            return Outcome.HANDOFF

        if command is not None and command.kind is CommandKind.RESET:
            await self._conversations.delete_conversation(message.customer)
            self._telemetry.count("resets")
            log.info("conversation reset kf=%s customer=%s", message.open_kfid, message.external_userid)
            await replies.send(route.texts.reset_done)
            return Outcome.RESET

        if self._rate_limiter is not None:
            decision = self._rate_limiter.check(message.customer)
            if decision is not RateDecision.ALLOW:
                return await self._over_limit(message, route, replies, decision)

        if message.kind is not Kind.TEXT:
            prepared = voice or (
                await self._media.prepare(message, route)
                if self._media is not None
                else PreparedQuestion(reply=route.texts.unsupported)
            )
            if prepared.reply or not prepared.query:
                await replies.send(prepared.reply or route.texts.unsupported)
                self._telemetry.count("unsupported")
                return Outcome.UNSUPPORTED if not replies.human_owns_session else Outcome.SILENT
            return await self._answer_with_dify(message, route, replies, prepared, interim=not refusing)

        prepared = PreparedQuestion(query=message.text)
        if attached and self._media is not None:
            prepared = await self._media.attach(prepared, attached, route, replies)
        return await self._answer_with_dify(message, route, replies, prepared, interim=not refusing)

    def _stay_silent(self, message: InboundMessage, state: SessionState | None) -> Outcome:
        """A human owns the session or it waits in the queue: the message is recorded, not answered."""
        owner = _SILENT_OWNERS.get(state, "ended") if state is not None else "unknown"
        self._telemetry.count(f"replies_suppressed_{owner}")
        known = self._sessions.known(message.customer) if self._sessions is not None else None
        log.info(
            "not answering kf=%s customer=%s msgid=%s: session state %s (%s)%s",
            message.open_kfid,
            message.external_userid,
            message.msgid,
            int(state) if state is not None else "?",
            owner,
            f" servicer={known.servicer_userid}" if known is not None and known.servicer_userid else "",
        )
        return Outcome.SILENT

    async def _over_limit(
        self, message: InboundMessage, route: KfRoute, replies: ReplySession, decision: RateDecision
    ) -> Outcome:
        self._telemetry.count_labelled("rate_limited", decision.value)
        rule = self._rate_limiter.rule if self._rate_limiter is not None else None
        log.info(
            "rate limited kf=%s customer=%s msgid=%s (%s per %s s): %s",
            message.open_kfid,
            message.external_userid,
            message.msgid,
            rule.limit if rule else "?",
            f"{rule.window_s:g}" if rule else "?",
            "notice sent" if decision is RateDecision.NOTIFY else "quiet",
        )
        if decision is RateDecision.NOTIFY:
            await replies.send(route.texts.rate_limited)
        return Outcome.RATE_LIMITED

    async def _answer_with_dify(
        self,
        message: InboundMessage,
        route: KfRoute,
        replies: ReplySession,
        prepared: PreparedQuestion,
        *,
        interim: bool = True,
    ) -> Outcome:
        ask = asyncio.ensure_future(self._ask(message, route, prepared))
        try:
            if interim and self._options.interim_after_s > 0:
                done, _ = await asyncio.wait({ask}, timeout=self._options.interim_after_s)
                if not done and replies.remaining > 1:
                    await replies.send(route.texts.interim)
            asked = await ask
        except ChatEngineError as exc:
            self._telemetry.count("fallbacks")
            log.warning(
                "dify failed kf=%s customer=%s msgid=%s code=%s status=%s: %s",
                message.open_kfid,
                message.external_userid,
                message.msgid,
                exc.code,
                exc.status,
                exc.message[:300],
            )
            await replies.send(route.texts.fallback)
            return Outcome.FALLBACK if not replies.human_owns_session else Outcome.SILENT
        finally:
            if not ask.done():
                ask.cancel()

        # The handoff marker goes before rendering and splitting: the customer never sees it.
        marked = take_handoff_marker(asked.answer.text, self._options.handoff_markers)
        text = self._render(marked.text) if marked.text.strip() else ""
        if marked.handoff and self._handoff is not None:
            if text.strip():
                # The answer first, while the session is still the bot's; one message kept for a refusal.
                await replies.send_answer(text, route.texts, reserve=1)
            if replies.human_owns_session:  # a human took the session meanwhile (95018): nothing to do
                return Outcome.SILENT
            await self._handoff(message, route, replies, trigger="marker")
            return Outcome.HANDOFF
        if not text.strip():
            log.warning(
                "dify answered with nothing kf=%s customer=%s msgid=%s",
                message.open_kfid,
                message.external_userid,
                message.msgid,
            )
            self._telemetry.count("empty_answers")
            await replies.send(route.texts.fallback)
            return Outcome.FALLBACK
        reserve = self._media.reserved_slots(asked.answer) if self._media is not None else 0
        sent = await replies.send_answer(text, route.texts, reserve=reserve)
        if sent == 0:
            return Outcome.SILENT
        if self._media is not None:
            await self._media.deliver(asked.answer, route, replies)
        self._telemetry.count("answered")
        return Outcome.ANSWERED

    async def _ask(self, message: InboundMessage, route: KfRoute, prepared: PreparedQuestion) -> _Asked:
        customer = message.customer
        conversation = await self._conversations.get_conversation(customer)
        idle = self._options.conversation_idle_ttl_s
        conversation_id = current_conversation_id(conversation, now=self._clock.now(), idle_ttl_s=idle)
        retries_left = max(self._options.dify_retries, 0)
        restarted = False
        while True:
            question = Question(
                user=customer.dify_user(),
                query=prepared.query,
                conversation_id=conversation_id,
                inputs=dict(self._options.inputs),
                files=prepared.files,
                trace_id=_trace_id(message),
            )
            started = time.monotonic()
            try:
                async with self._dify_slots:
                    log.info(
                        "asking dify kf=%s customer=%s msgid=%s conversation=%s",
                        message.open_kfid,
                        message.external_userid,
                        message.msgid,
                        conversation_id or "new",
                    )
                    answer = await route.engine.ask(question)
            except ConversationGone:
                elapsed = time.monotonic() - started
                if conversation_id is None or restarted:
                    raise ChatEngineError("conversation_gone", "Dify refused a new conversation") from None
                log.info(
                    "dify conversation gone, starting a new one kf=%s customer=%s",
                    message.open_kfid,
                    message.external_userid,
                )
                self._telemetry.count("conversations_restarted")
                await self._conversations.delete_conversation(customer)
                conversation, conversation_id, restarted = None, None, True
                continue
            except ChatEngineError as exc:
                self._telemetry.observe(t.DIFY, time.monotonic() - started)
                self._telemetry.count_labelled("dify_errors", exc.code)
                self._telemetry.reachability("dify", exc.code not in ("unreachable",), exc.code)
                # A timed-out answer already cost the customer the whole wait: do not make them wait twice.
                if exc.retryable and retries_left > 0 and exc.code not in ("timeout", "idle_timeout"):
                    retries_left -= 1
                    await asyncio.sleep(self._options.dify_retry_delay_s * (1 + random.random()))
                    continue
                raise
            elapsed = time.monotonic() - started
            self._telemetry.observe(t.DIFY, elapsed)
            self._telemetry.reachability("dify", True)
            log.info(
                "dify answered kf=%s customer=%s msgid=%s chars=%d in %.0f ms",
                message.open_kfid,
                message.external_userid,
                message.msgid,
                len(answer.text),
                elapsed * 1000,
            )
            updated = after_answer(
                conversation, conversation_id=answer.conversation_id, now=self._clock.now(), idle_ttl_s=idle
            )
            if answer.conversation_id:
                await self._conversations.put_conversation(customer, updated)
            return _Asked(answer, elapsed)


def _backoff(base_s: float, attempt: int) -> float:
    """Exponential backoff with jitter: base, 2×base, 4×base ... each stretched by up to 2×."""
    return base_s * (2**attempt) * (1 + random.random())


def _trace_id(message: InboundMessage) -> str:
    """Dify's X-Trace-Id allows [A-Za-z0-9_-]{1,128}; the WeCom msgid ties the two logs together."""
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_" for ch in message.msgid)[:128]
