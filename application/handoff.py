"""Hand a customer to a human: `kf/service_state/trans` to the queue or a named servicer, then a notice.

After a successful transfer the session is no longer the bot's, so `send_msg` would answer 95018: the
notice goes with `send_msg_on_event` and the msg_code the transfer returned (docs/wecom-kf.md). Without a
code it is tried with `send_msg`, and a 95018 then is expected, not an error.
"""

from __future__ import annotations

import logging

from application.errors import WeComError
from application.handoff_feedback import HandoffFeedback
from application.ports import KfChannel
from application.reply_session import ReplySession
from application.routing import KfRoute
from application.session_state import SessionStates
from application.telemetry import Telemetry
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import InboundMessage
from domain.replies import TEXT_LIMIT_BYTES, split_reply
from domain.session import handoff_target

log = logging.getLogger("kfdify.handoff")

# Part number of the notice's outbound msgid: apart from the (at most 5) reply parts of the same message.
NOTICE_PART = 90


class HandOffToHuman:
    def __init__(
        self,
        *,
        channel: KfChannel,
        sessions: SessionStates,
        telemetry: Telemetry,
        feedback: HandoffFeedback | None = None,
    ) -> None:
        """`feedback`: marks the bot's last answer when a customer asks for a human right after it."""
        self._feedback = feedback
        self._channel = channel
        self._sessions = sessions
        self._telemetry = telemetry

    async def __call__(
        self, message: InboundMessage, route: KfRoute, replies: ReplySession, *, trigger: str
    ) -> bool:
        """Transfer the session; True when WeCom accepted. `trigger`: "keyword" or "marker" (for counts)."""
        customer = message.customer
        if self._feedback is not None and trigger == "keyword":  # the app's own decision teaches nothing
            self._feedback.customer_asked_for_human(message, route)
        target = handoff_target(route.servicer_userid)
        try:
            code = await self._channel.transfer_service_state(
                customer, state=int(target), servicer_userid=route.servicer_userid
            )
        except WeComError as exc:
            self._telemetry.count_labelled("handoff_failures", str(exc.errcode))
            log.warning(
                "handoff refused target_state=%d servicer=%s errcode=%s errmsg=%s",
                target,
                route.servicer_userid or "-",
                exc.errcode,
                exc.errmsg,
            )
            # The session is still the bot's: say so politely.
            await replies.send(route.texts.handoff_failed)
            return False
        self._sessions.learn(customer, target, servicer_userid=route.servicer_userid)
        self._telemetry.count_labelled("handoffs", trigger)
        log.info(
            "handed off trigger=%s target_state=%d servicer=%s msg_code=%s",
            trigger,
            target,
            route.servicer_userid or "-",
            "yes" if code else "no",
        )
        notice = _fit(route.texts.handoff)
        if notice:
            if code:
                await self._notify_on_event(message, code, notice)
            else:
                await replies.send(notice)  # 95018 expected now: ReplySession takes it quietly
            # Whatever the notice met, the session is where the transfer put it.
            self._sessions.learn(customer, target, servicer_userid=route.servicer_userid)
        return True

    async def _notify_on_event(self, message: InboundMessage, code: str, notice: str) -> None:
        msgid = outbound_msgid(DedupeKey.for_message(message), NOTICE_PART)
        try:
            await self._channel.send_on_event(code, notice, msgid=msgid)
        except WeComError as exc:
            self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
            log.warning("handoff notice not sent errcode=%s %s", exc.errcode, exc.errmsg)
            return
        self._telemetry.count("handoff_notices")


def _fit(text: str) -> str:
    parts = split_reply(text, max_bytes=TEXT_LIMIT_BYTES, max_parts=1, truncation_notice="…")
    return parts[0] if parts else ""
