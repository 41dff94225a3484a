"""The replies to one customer message: at most 5 (WeCom's quota), named after the message so that a resend
is a repeat WeCom refuses, resent with backoff while WeCom is busy, quiet when a human owns the session."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from application import telemetry as t
from application.errors import WeComError
from application.options import BotOptions, ReplyTexts
from application.ports import KfChannel
from application.session_state import SessionStates
from application.telemetry import Telemetry
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import InboundMessage
from domain.replies import MESSAGES_PER_CUSTOMER_MESSAGE, split_reply
from domain.session import SessionState

log = logging.getLogger("kfdify.answer")


class ReplySession:
    """The replies to one customer message: at most 5, named after it so that a resend is a repeat."""

    def __init__(
        self,
        *,
        channel: KfChannel,
        message: InboundMessage,
        telemetry: Telemetry,
        options: BotOptions,
        sessions: SessionStates,
        quota: int = MESSAGES_PER_CUSTOMER_MESSAGE,
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

    async def send_menu(self, head: str, items: Sequence[tuple[str, str]]) -> bool:
        """Send a msgmenu of (id, content) click items (already within WeCom's limits): the same quota and
        msgid scheme as texts. False when it could not be sent."""
        if not items:
            return False
        return await self._deliver(
            "menu",
            lambda msgid: self._channel.send_menu(self._message.customer, head, items, msgid=msgid),
            size=len(head.encode()),
        )

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

    async def _deliver(self, kind: str, send: Callable[[str], Awaitable[object]], *, size: int = 0) -> bool:
        """One reply message within the quota, named `<digest>_<part>` after the customer's message, resent
        with the same name while WeCom is busy. False when it could not be sent."""
        if self.human_owns_session or self.remaining <= 0:
            return False
        part = self.used
        self.used += 1
        msgid = outbound_msgid(self._key, part)
        attempts = 1 + (max(self._options.send_retries, 0) if self._retry else 0)
        may_have_landed = False  # an earlier attempt of this msgid timed out or failed on the way
        for attempt in range(attempts):
            started = time.monotonic()
            try:
                await send(msgid)
            except WeComError as exc:
                self._telemetry.observe(t.SEND, time.monotonic() - started)
                if may_have_landed and refuses_repeated_msgid(exc):
                    self._landed_before(kind, part, size, exc)
                    return True
                may_have_landed = may_have_landed or exc.errcode is None
                if not await self._may_resend(exc, kind, part, last=attempt + 1 >= attempts):
                    return False
                # Same outbound msgid on the retry: WeCom refuses a repeat if the first one did land.
                await asyncio.sleep(backoff(self._options.send_retry_delay_s, attempt))
            else:
                self._sent(kind, part, size, time.monotonic() - started)
                return True
        return False

    async def _may_resend(self, exc: WeComError, kind: str, part: int, *, last: bool) -> bool:
        """Account for a failed send; True when sending the same part again may help."""
        if exc.errcode == WeComError.SESSION_NOT_SENDABLE:
            # A human servicer owns the session (or the 48 h window closed): stay quiet, no error.
            self.human_owns_session = True
            self._telemetry.count("replies_suppressed_human")
            self._sessions.learn(self._message.customer, SessionState.HUMAN)
            log.info("reply not sent: session is not the bot's (95018)")
            return False
        self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
        if exc.is_transient and not last:
            return True
        log.warning("%s reply part %d failed errcode=%s errmsg=%s", kind, part, exc.errcode, exc.errmsg)
        return False

    def _sent(self, kind: str, part: int, size: int, elapsed: float) -> None:
        self._telemetry.observe(t.SEND, elapsed)
        self._telemetry.count("replies_sent" if kind == "text" else f"{kind}_replies_sent")
        self._telemetry.reachability("wecom", True)
        self.delivered += 1
        # Sending through the API hands the session to the bot (docs/wecom-kf.md).
        self._sessions.learn(self._message.customer, SessionState.BOT)
        log.info("reply sent part=%d %s bytes=%d in %.0f ms", part, kind, size, elapsed * 1000)

    def _landed_before(self, kind: str, part: int, size: int, exc: WeComError) -> None:
        """A resend refused as a repeat: the attempt whose answer was lost did land. Delivered, once."""
        self._telemetry.count("resend_already_delivered")
        self._telemetry.count("replies_sent" if kind == "text" else f"{kind}_replies_sent")
        self._telemetry.reachability("wecom", True)
        self.delivered += 1
        self._sessions.learn(self._message.customer, SessionState.BOT)
        log.info(
            "reply part=%d %s bytes=%d already delivered: the resend was refused as a repeat (errcode=%s)",
            part,
            kind,
            size,
            exc.errcode,
        )


# WeCom's refusal of a msgid it has seen (docs/wecom-kf.md §6.2): NOT VERIFIED against real WeCom. 95033 is
# what peers report; 40058 is the generic "invalid parameter", so it counts only when its errmsg names the
# msgid or a repeat.
DUPLICATE_MSGID_ERRCODE = 95033
_INVALID_PARAMETER = 40058
_REPEAT_WORDS = ("msgid", "duplicate", "重复")


def refuses_repeated_msgid(exc: WeComError) -> bool:
    """Whether `exc` is WeCom refusing a send because its msgid was used already."""
    if exc.errcode == DUPLICATE_MSGID_ERRCODE:
        return True
    errmsg = exc.errmsg.lower()
    return exc.errcode == _INVALID_PARAMETER and any(word in errmsg for word in _REPEAT_WORDS)


def backoff(base_s: float, attempt: int) -> float:
    """Exponential backoff with jitter: base, 2×base, 4×base ... each stretched by up to 2×."""
    return base_s * (2.0**attempt) * (1 + random.random())
