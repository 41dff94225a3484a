"""What the pull sees besides customer messages (an `ItemObserver`): servicer messages and system events.

- servicer messages and session_status_change events update the session-state cache;
- enter_session with a welcome_code starts the welcome, in the background: the pull never waits for Dify;
- msg_send_fail is logged with what its fail_type means and counted; a customer who refuses our messages
  (fail_type 10) is remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from application.customer_profile import ProfileBook
from application.log_context import handling
from application.rejections import RejectedCustomers
from application.session_state import SessionStates
from application.telemetry import Telemetry
from application.welcome import WelcomeCustomer
from domain.customer import EntryContext
from domain.delivery import describe_fail_type, means_customer_rejects
from domain.messages import InboundMessage, KfEvent
from domain.session import state_after_item

log = logging.getLogger("kfdify.events")


class SessionEvents:
    def __init__(
        self,
        *,
        sessions: SessionStates,
        welcome: WelcomeCustomer,
        rejections: RejectedCustomers,
        telemetry: Telemetry,
        close_grace_s: float = 2.0,
        profiles: ProfileBook | None = None,
    ) -> None:
        """`profiles`: learns where each customer came from (enter_session's scene, scene_param, 视频号)."""
        self._profiles = profiles
        self._sessions = sessions
        self._welcome = welcome
        self._rejections = rejections
        self._telemetry = telemetry
        self._close_grace_s = close_grace_s
        self._tasks: set[asyncio.Task[bool]] = set()

    async def on_item(self, message: InboundMessage) -> None:
        with handling(message):  # log lines (and the welcome task) name the item
            self._on_item(message)
            if self._profiles is not None and message.event is not None:
                await self._note_entry(message, message.event)

    async def _note_entry(self, message: InboundMessage, event: KfEvent) -> None:
        if event.event_type != "enter_session" or not message.external_userid:
            return
        entry = EntryContext.of(
            scene=event.scene,
            scene_param=event.scene_param,
            channels={
                "nickname": message.extra.get("wechat_channels.nickname", ""),
                "scene": _int(message.extra.get("wechat_channels.scene", "")),
            },
            at=float(message.send_time),
        )
        assert self._profiles is not None
        await self._profiles.note_entry(message.customer, entry)

    def _on_item(self, message: InboundMessage) -> None:
        state = state_after_item(message)
        if state is not None:
            servicer = message.extra.get("servicer_userid", "")
            if message.event is not None:
                servicer = message.event.new_servicer_userid
            self._sessions.learn(
                message.customer, state, since=float(message.send_time), servicer_userid=servicer
            )
        event = message.event
        if event is None:
            self._telemetry.count("servicer_messages" if message.is_from_servicer else "other_items")
            if message.is_from_servicer:
                log.info(
                    "servicer message servicer=%s: the session is a human's",
                    message.extra.get("servicer_userid", "-"),
                )
            return
        self._telemetry.count_labelled("events", event.event_type or "unknown")
        if event.event_type == "enter_session":
            self._on_enter_session(message, event)
        elif event.event_type == "msg_send_fail":
            self._on_send_fail(message, event)
        elif event.event_type == "session_status_change":
            log.info(
                "session status change change_type=%s old=%s new=%s → state %s",
                event.change_type,
                event.old_servicer_userid or "-",
                event.new_servicer_userid or "-",
                int(state) if state is not None else "unchanged",
            )
        else:
            log.info("event %s", event.event_type)

    def _on_enter_session(self, message: InboundMessage, event: KfEvent) -> None:
        log.info(
            "customer entered scene=%s welcome_code=%s",
            event.scene or "-",
            "yes" if event.welcome_code else "no",
        )
        if event.welcome_code:
            task = asyncio.create_task(self._welcome(message))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("welcome failed unexpectedly", exc_info=task.exception())

    def _on_send_fail(self, message: InboundMessage, event: KfEvent) -> None:
        self._telemetry.count_labelled("send_failures", str(event.fail_type))
        rejects = means_customer_rejects(event.fail_type)
        log.warning(
            "WeCom could not deliver our msgid=%s fail_type=%s (%s)%s",
            event.fail_msgid or "-",
            event.fail_type,
            describe_fail_type(event.fail_type),
            "; no proactive texts to this customer until they write again" if rejects else "",
        )
        if rejects and message.external_userid:
            self._rejections.remember(message.customer, at=float(message.send_time))

    async def idle(self) -> None:
        """Wait until every welcome under way has finished (tests)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def aclose(self) -> None:
        """Shutdown: a welcome has at most seconds left anyway; give it a moment, then cancel."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=self._close_grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0
