"""Pull a kf account's new messages with `kf/sync_msg`, record them safely, then advance the cursor."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from application import telemetry as t
from application.errors import WeComError
from application.options import BotOptions
from application.ports import (
    Clock,
    CursorStore,
    Inbox,
    KfChannel,
    MessageLedger,
    MessageState,
    PullCoordination,
)
from application.telemetry import Telemetry
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, is_too_old

log = logging.getLogger("kfdify.pull")

# A misbehaving API that keeps saying has_more without moving the cursor must not spin us forever.
MAX_PAGES_PER_PULL = 500
MAX_STUCK_PAGES = 3
# 95007: the callback token expired (it lives 10 minutes); the pull goes on without it.
INVALID_MSG_TOKEN = 95007
# Without a persistent store, a restart forgets what was answered: on the first pull without a cursor only
# messages sent after the process started (less this much clock slack) are answered.
COLD_START_SLACK_S = 30.0
# A stored cursor WeCom refuses this many pulls in a row (a non-transient errcode) is dropped: the account is
# pulled afresh without cursor, from the start of WeCom's history (done marks and the history guard keep every
# message answered at most once). Otherwise one bad cursor would stop the bot for that kf account for good.
CURSOR_REFUSALS_BEFORE_DROP = 3


def _refuses_cursor(exc: WeComError) -> bool:
    """A pull carrying a cursor failed in a way that may be the cursor's fault: not transient (busy, rate
    limited, unreachable), not the deployment (credentials, IP allow-list) and not the access token."""
    return (
        exc.errcode is not None
        and not exc.is_transient
        and not exc.is_config_error
        and exc.errcode not in WeComError.TOKEN_ERRCODES
        and exc.errcode != INVALID_MSG_TOKEN
    )


class ItemObserver(Protocol):
    """Sees what is not a customer message to answer: events and servicer messages
    (application/session_events.py). Called in pull order; must not wait for slow work."""

    async def on_item(self, message: InboundMessage) -> None: ...


class PullStore(CursorStore, MessageLedger, Inbox, PullCoordination, Protocol):
    """What a pull needs of the state store: the cursor, the marks of the pulled messages, the inbox to record
    them in, and the pull lease to renew."""


@dataclass(slots=True)
class _Refusals:
    cursor: str
    count: int = 0


@dataclass(slots=True)
class PullResult:
    pulled: int = 0
    recorded: int = 0
    customers: set[CustomerRef] = field(default_factory=set)
    pages: int = 0
    lost_lease: bool = False


class PullMessages:
    """One pull of one kf account, by the instance holding its pull lease."""

    def __init__(
        self,
        *,
        store: PullStore,
        channel: KfChannel,
        clock: Clock,
        options: BotOptions,
        telemetry: Telemetry,
        observer: ItemObserver,
        owner: str,
        persistent_store: bool,
        started_at: float,
    ) -> None:
        self._store = store
        self._channel = channel
        self._clock = clock
        self._options = options
        self._telemetry = telemetry
        self._observer = observer
        self._owner = owner
        self._persistent = persistent_store
        self._started_at = started_at
        # Per kf account: the stored cursor WeCom refused on the last pulls, and how many times in a row.
        self._refusals: dict[str, _Refusals] = {}

    async def __call__(self, open_kfid: str, *, token: str = "") -> PullResult:
        started = time.monotonic()
        result = PullResult()
        cursor = await self._store.get_cursor(open_kfid)
        refused = self._refusals.get(open_kfid)
        if cursor is not None and refused is not None and refused.cursor == cursor:
            if refused.count >= CURSOR_REFUSALS_BEFORE_DROP:
                cursor = None  # dropped before, but the fresh pull did not get to replace it yet
        else:
            self._refusals.pop(open_kfid, None)
        not_before = self._not_before(cursor)
        stuck = 0
        while result.pages < MAX_PAGES_PER_PULL:
            try:
                page = await self._channel.sync_messages(open_kfid, cursor=cursor, token=token or None)
            except WeComError as exc:
                if exc.errcode == INVALID_MSG_TOKEN and token:
                    token = ""
                    continue
                if cursor is not None and result.pages == 0 and _refuses_cursor(exc):
                    if self._cursor_refused(open_kfid, cursor, exc):
                        cursor = None
                        not_before = self._not_before(cursor)
                        continue
                self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
                self._telemetry.reachability(
                    "wecom", exc.errcode is not None, f"sync_msg errcode {exc.errcode}"
                )
                raise
            self._telemetry.reachability("wecom", True)
            if result.pages == 0:
                self._refusals.pop(open_kfid, None)  # whatever cursor it carried, WeCom took it
            result.pages += 1
            result.pulled += len(page.messages)
            await self._record(page.messages, result, not_before=not_before)
            moved = bool(page.next_cursor) and page.next_cursor != cursor
            if page.next_cursor:
                # Only now, with the page's messages recorded, may the cursor move past them.
                await self._store.set_cursor(open_kfid, page.next_cursor)
                cursor = page.next_cursor
            if not page.has_more:
                break
            stuck = 0 if (moved or page.messages) else stuck + 1
            if stuck >= MAX_STUCK_PAGES:
                log.warning(
                    "sync_msg keeps saying has_more without progress kf=%s; pulling again later", open_kfid
                )
                break
            if not await self._store.renew_pull(
                open_kfid, owner=self._owner, lease_s=self._options.pull_lease_s
            ):
                result.lost_lease = True
                log.warning("pull lease lost mid-pull kf=%s; leaving the rest to its new holder", open_kfid)
                break
        elapsed = time.monotonic() - started
        self._telemetry.observe(t.PULL, elapsed)
        self._telemetry.count("messages_pulled", result.pulled)
        log.info(
            "pulled kf=%s items=%d new=%d pages=%d in %.0f ms",
            open_kfid,
            result.pulled,
            result.recorded,
            result.pages,
            elapsed * 1000,
        )
        return result

    def _not_before(self, cursor: str | None) -> float:
        """Without a persistent store, a pull without cursor answers only what was sent since the start."""
        if cursor is None and not self._persistent:
            return self._started_at - COLD_START_SLACK_S
        return 0.0

    def _cursor_refused(self, open_kfid: str, cursor: str, exc: WeComError) -> bool:
        """Count a refusal of the stored cursor; True when it is to be dropped now."""
        refused = self._refusals.get(open_kfid)
        if refused is None or refused.cursor != cursor:
            refused = self._refusals[open_kfid] = _Refusals(cursor)
        refused.count += 1
        if refused.count < CURSOR_REFUSALS_BEFORE_DROP:
            return False
        self._telemetry.count_labelled("wecom_errors", str(exc.errcode))
        self._telemetry.count("cursors_dropped")
        log.warning(
            "kf/sync_msg refused the stored cursor of kf=%s %d times (errcode %s): dropping it and pulling "
            "afresh from the start of WeCom's history; answered messages stay answered",
            open_kfid,
            refused.count,
            exc.errcode,
        )
        return True

    async def _record(
        self, messages: tuple[InboundMessage, ...], result: PullResult, *, not_before: float
    ) -> None:
        now = self._clock.now()
        customer_messages: list[InboundMessage] = []
        for message in messages:
            if not message.is_from_customer:
                try:
                    await self._observer.on_item(message)
                except Exception:  # an event we mishandle must not stop the pull
                    log.exception("handling %s item %s failed", message.msgtype, message.msgid)
                continue
            customer_messages.append(message)
        if not customer_messages:
            return
        keys = [DedupeKey.for_message(message) for message in customer_messages]
        # The marks of the whole page in one read, not one per message.
        states = await self._store.states(keys)
        fresh: list[InboundMessage] = []
        for message, key, state in zip(customer_messages, keys, states, strict=True):
            if is_too_old(message, now=now, max_age_s=self._options.max_message_age_s) or (
                message.send_time < not_before
            ):
                if state is MessageState.NEW:
                    await self._store.finish(key)
                self._telemetry.count("ignored_too_old")
                log.info(
                    "not answering old message kf=%s customer=%s msgid=%s age=%.0fs",
                    message.open_kfid,
                    message.external_userid,
                    message.msgid,
                    now - message.send_time,
                )
                continue
            if state is MessageState.DONE:
                self._telemetry.count("deduplicated")
                log.info("already handled kf=%s msgid=%s", message.open_kfid, message.msgid)
                continue
            fresh.append(message)
        if fresh:
            await self._store.record(fresh)
            result.recorded += len(fresh)
            result.customers.update(m.customer for m in fresh)
