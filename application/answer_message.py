"""Answer one customer message: session state, commands, handoff, fair use, the Dify question, and the
replies within WeCom's limits.

The steps live next door: the replies and their quota in reply_session.py, the Dify question in ask_dify.py,
media in media.py (through the MediaPreparer port, media_port.py), the handoff in handoff.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from application.app_parameters import AppParametersCache
from application.ask_dify import AskDify
from application.errors import ChatEngineError
from application.handoff import HandOffToHuman
from application.media_port import MediaPreparer, PreparedQuestion
from application.options import BotOptions
from application.outcomes import Outcome
from application.ports import KfChannel
from application.progressive import PARAMETERS_RETRY_S, ProgressiveAnswers
from application.rate_limiter import CustomerRateLimiter
from application.rejections import RejectedCustomers
from application.reply_session import ReplySession
from application.routing import KfRoute, Routing
from application.session_state import SessionStates
from application.suggestions import SuggestQuestions, is_suggestion_tap
from application.telemetry import Telemetry
from domain.commands import CommandKind, CommandSet
from domain.handoff import take_handoff_marker
from domain.message_text import question_for
from domain.messages import InboundMessage, Kind
from domain.rate_limit import RateDecision
from domain.session import SessionState, bot_may_answer

log = logging.getLogger("kfdify.answer")

# Who has the session when the bot stays silent (for counters and logs).
_SILENT_OWNERS: dict[SessionState, str] = {SessionState.HUMAN: "human", SessionState.QUEUED: "queued"}


class AnswerCustomerMessage:
    """One customer message in, the right replies out. Never raises for Dify or WeCom failures."""

    def __init__(
        self,
        *,
        ask: AskDify,
        channel: KfChannel,
        routing: Routing,
        options: BotOptions,
        telemetry: Telemetry,
        render: Callable[[str], str],
        media: MediaPreparer,
        sessions: SessionStates,
        handoff: HandOffToHuman,
        rate_limiter: CustomerRateLimiter,
        rejections: RejectedCustomers,
    ) -> None:
        self._ask = ask
        self._channel = channel
        self._routing = routing
        self._options = options
        self._telemetry = telemetry
        self._render = render
        self._media = media
        self._sessions = sessions
        self._handoff = handoff
        self._rate_limiter = rate_limiter
        self._rejections = rejections
        self._commands = CommandSet.of(reset=options.reset_words, handoff=options.handoff_words)
        # Progressive replies and suggested questions read the app's /parameters (moderation, suggestions).
        parameters = AppParametersCache(
            ttl_s=options.app_parameters_ttl_s, failure_retry_s=PARAMETERS_RETRY_S
        )
        self._progressive = ProgressiveAnswers(
            parameters=parameters, render=render, options=options, telemetry=telemetry
        )
        self._suggestions = SuggestQuestions(parameters=parameters, options=options, telemetry=telemetry)

    async def __call__(self, message: InboundMessage, *, attached: Sequence[InboundMessage] = ()) -> Outcome:
        """`attached`: images the customer sent just before this text, asked together with it (drain)."""
        route = self._routing.for_kf(message.open_kfid)
        # A customer who refused our messages gets no interim text and no resends, until they write again.
        refusing = await self._rejections.refusing(message.customer, message_time=message.send_time)
        replies = ReplySession(
            channel=self._channel,
            message=message,
            telemetry=self._telemetry,
            options=self._options,
            sessions=self._sessions,
            retry=not refusing,
        )
        state = await self._sessions.state_for(message)
        if not bot_may_answer(state):
            return self._stay_silent(message, state)
        if message.kind is Kind.TEXT:
            return await self._answer_text(
                message, route, replies, attached=attached, counted=False, interim=not refusing
            )

        # Media counts against the fair-use limit before anything is downloaded, converted or transcribed.
        decision = await self._rate_limiter.admit(message.customer)
        if decision is not RateDecision.ALLOW:
            return await self._over_limit(route, replies, decision)
        # A card, link, location ... with meaning in words is asked as such; never parsed as a command.
        described = question_for(message, route.texts.message_templates)
        if described is not None:
            self._telemetry.count_labelled("described_messages", message.msgtype)
            log.info("non-text message asked in words msgtype=%s chars=%d", message.msgtype, len(described))
            return await self._answer_with_dify(
                message, route, replies, PreparedQuestion(query=described), interim=not refusing
            )
        prepared = await self._media.prepare(message, route)
        if prepared.as_text:  # a voice transcript is answered exactly as if typed, commands included
            typed = replace(message, msgtype=Kind.TEXT.value, text=prepared.query)
            return await self._answer_text(
                typed, route, replies, attached=(), counted=True, interim=not refusing
            )
        if prepared.reply or not prepared.query:
            await replies.send(prepared.reply or route.texts.unsupported)
            self._telemetry.count("unsupported")
            return Outcome.UNSUPPORTED if not replies.human_owns_session else Outcome.SILENT
        return await self._answer_with_dify(message, route, replies, prepared, interim=not refusing)

    async def _answer_text(
        self,
        message: InboundMessage,
        route: KfRoute,
        replies: ReplySession,
        *,
        attached: Sequence[InboundMessage],
        counted: bool,
        interim: bool,
    ) -> Outcome:
        """A typed (or transcribed) text: a command, or a question. `counted`: the rate limit saw it
        already; `interim`: an interim text may be sent while Dify thinks."""
        if is_suggestion_tap(message):
            self._telemetry.count("suggestions_tapped")
        command = self._commands.parse(message.text)
        if command is not None and command.kind is CommandKind.HANDOFF:
            await self._handoff(message, route, replies, trigger="keyword")
            return Outcome.HANDOFF
        if command is not None and command.kind is CommandKind.RESET:
            await self._ask.forget(message.customer)
            self._telemetry.count("resets")
            log.info("conversation reset")
            await replies.send(route.texts.reset_done)
            return Outcome.RESET
        if not counted:
            decision = await self._rate_limiter.admit(message.customer)
            if decision is not RateDecision.ALLOW:
                return await self._over_limit(route, replies, decision)
        prepared = PreparedQuestion(query=message.text)
        if attached:
            prepared = await self._media.attach(prepared, attached, route, replies)
        return await self._answer_with_dify(message, route, replies, prepared, interim=interim)

    def _stay_silent(self, message: InboundMessage, state: SessionState | None) -> Outcome:
        """A human owns the session or it waits in the queue: the message is recorded, not answered."""
        owner = _SILENT_OWNERS.get(state, "ended") if state is not None else "unknown"
        self._telemetry.count(f"replies_suppressed_{owner}")
        known = self._sessions.known(message.customer)
        log.info(
            "not answering: session state %s (%s)%s",
            int(state) if state is not None else "?",
            owner,
            f" servicer={known.servicer_userid}" if known is not None and known.servicer_userid else "",
        )
        return Outcome.SILENT

    async def _over_limit(self, route: KfRoute, replies: ReplySession, decision: RateDecision) -> Outcome:
        self._telemetry.count_labelled("rate_limited", decision.value)
        rule = self._rate_limiter.rule
        log.info(
            "rate limited (%s per %s s): %s",
            rule.limit,
            f"{rule.window_s:g}",
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
        progress = self._progressive.start(route, replies)
        ask = asyncio.ensure_future(self._ask(message, route, prepared, progress=progress))
        try:
            if interim and self._options.interim_after_s > 0:
                done, _ = await asyncio.wait({ask}, timeout=self._options.interim_after_s)
                # Not once parts of the answer are on their way: the customer is reading already.
                early = progress is not None and progress.committed
                if not done and replies.remaining > 1 and not early:
                    await replies.send(route.texts.interim)
            asked = await ask
            if progress is not None:
                await progress.settle()
        except ChatEngineError as exc:
            if progress is not None:
                await progress.settle()
            self._telemetry.count("fallbacks")
            log.warning("dify failed code=%s status=%s: %s", exc.code, exc.status, exc.message[:300])
            await replies.send(route.texts.fallback)
            return Outcome.FALLBACK if not replies.human_owns_session else Outcome.SILENT
        finally:
            if not ask.done():
                ask.cancel()
            if progress is not None:
                progress.abandon()

        # The handoff marker goes before rendering and splitting: the customer never sees it.
        marked = take_handoff_marker(asked.answer.text, self._options.handoff_markers)
        # Parts already sent while Dify wrote (progressive.py): only the rest of the answer is left.
        early = progress is not None and progress.committed
        if progress is not None and early:
            text = progress.remainder(asked.answer.text)
        else:
            text = self._render(marked.text) if marked.text.strip() else ""
        if marked.handoff:
            if text.strip():
                # The answer first, while the session is still the bot's; one message kept for a refusal.
                await replies.send_answer(text, route.texts, reserve=1)
            if replies.human_owns_session:  # a human took the session meanwhile (95018): nothing to do
                return Outcome.SILENT
            await self._handoff(message, route, replies, trigger="marker")
            return Outcome.HANDOFF
        if asked.answer.needs_human_input:
            return await self._paused(text, route, replies)
        if not text.strip() and not early:
            log.warning("dify answered with nothing")
            self._telemetry.count("empty_answers")
            await replies.send(route.texts.fallback)
            return Outcome.FALLBACK
        reserve = self._media.reserved_slots(asked.answer)
        sent = await replies.send_answer(text, route.texts, reserve=reserve) if text.strip() else 0
        if sent == 0 and not (early and replies.delivered):
            return Outcome.SILENT
        await self._media.deliver(asked.answer, route, replies)
        await self._suggestions.offer(message, route, replies, asked.answer)
        self._telemetry.count("answered")
        return Outcome.ANSWERED

    async def _paused(self, text: str, route: KfRoute, replies: ReplySession) -> Outcome:
        """The workflow waits for a human (Dify's human-input node; the adapter logged which node): the
        answer so far, then the `needs_human_input` text, never the fallback."""
        self._telemetry.count("needs_human_input")
        if text.strip():
            await replies.send_answer(text, route.texts, reserve=1)
        if replies.human_owns_session:
            return Outcome.SILENT
        sent = await replies.send(route.texts.needs_human_input)
        return Outcome.ANSWERED if sent or replies.delivered else Outcome.SILENT
