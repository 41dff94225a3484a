"""Welcome a customer who enters a session: `kf/send_msg_on_event` with the event's welcome_code.

The code is single use and lives 20 seconds (docs/wecom-kf.md): stale events get nothing, and composing the
welcome (the AI app's /parameters, cached per route) is bounded by a deadline inside that window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from application.app_parameters import AppParametersCache
from application.errors import ChatEngineError, WeComError
from application.log_context import handling
from application.options import BotOptions
from application.ports import Clock, KfChannel
from application.rejections import RejectedCustomers
from application.routing import KfRoute, Routing
from application.telemetry import Telemetry
from domain.dedupe import DedupeKey, outbound_msgid
from domain.messages import InboundMessage
from domain.welcome import Welcome, compose_welcome

log = logging.getLogger("kfdify.welcome")


class WelcomeCustomer:
    def __init__(
        self,
        *,
        channel: KfChannel,
        routing: Routing,
        clock: Clock,
        options: BotOptions,
        telemetry: Telemetry,
        rejections: RejectedCustomers,
        parameters: AppParametersCache,
        render: Callable[[str], str],
    ) -> None:
        self._channel = channel
        self._routing = routing
        self._clock = clock
        self._options = options
        self._telemetry = telemetry
        self._rejections = rejections
        self._parameters = parameters
        self._render = render

    async def __call__(self, message: InboundMessage) -> bool:
        """Welcome the customer of an enter_session `message`; True when a welcome went out."""
        with handling(message):
            return await self._welcome(message)

    async def _welcome(self, message: InboundMessage) -> bool:
        event = message.event
        code = event.welcome_code if event is not None else ""
        if not code:
            return False
        age = self._clock.now() - message.send_time
        budget = min(self._options.welcome_deadline_s, self._options.welcome_max_age_s - age)
        if budget <= 0:
            return self._skip(message, "stale", f"event is {age:.0f} s old")
        if await self._rejections.refusing(message.customer):
            return self._skip(message, "rejected", "the customer refuses our messages")
        route = self._routing.for_kf(message.open_kfid)
        try:
            async with asyncio.timeout(budget):
                welcome = await self._compose(route)
                if welcome is None:
                    return self._skip(message, "nothing_to_say", "no welcome text and no opening statement")
                msgid = outbound_msgid(DedupeKey.for_message(message), 0)
                await self._channel.send_on_event(code, welcome.text, msgid=msgid, menu=welcome.menu)
        except TimeoutError:
            return self._skip(message, "timeout", f"not ready within {budget:.0f} s", warn=True)
        except ChatEngineError as exc:
            return self._skip(message, "dify_error", f"Dify /parameters failed: {exc.code}", warn=True)
        except WeComError as exc:
            self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
            return self._skip(message, "wecom_error", f"errcode {exc.errcode} {exc.errmsg}", warn=True)
        self._telemetry.count("welcomes_sent")
        log.info("welcome sent menu_items=%d", len(welcome.menu))
        return True

    async def _compose(self, route: KfRoute) -> Welcome | None:
        configured = route.texts.welcome
        if configured.strip():
            return compose_welcome(configured=configured, opening_statement="")
        parameters = await self._parameters.get(route)
        opening = parameters.opening_statement
        return compose_welcome(
            configured="",
            opening_statement=self._render(opening) if opening.strip() else "",
            suggested_questions=parameters.suggested_questions,
        )

    def _skip(self, message: InboundMessage, reason: str, detail: str, *, warn: bool = False) -> bool:
        self._telemetry.count_labelled("welcomes_skipped", reason)
        log.log(
            logging.WARNING if warn else logging.INFO,
            "no welcome: %s",
            detail,
        )
        return False
