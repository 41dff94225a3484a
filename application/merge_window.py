"""Merge a customer's burst of texts into one question.

Customers type in bursts: "你好" / "我想退货" / "订单号 12345" within a few seconds. Answered one by one, they
get three answers, two of them about nothing. With a merge window of N seconds (`[BOT] MERGE_WINDOW`, 0 = off)
the drain asks them as one question, the texts in order, one per line, and answers once.

A text joins the burst when it directly follows the burst's last message in the customer's inbox and was sent
within N seconds of it, or while the bot was still gathering the burst. The drain waits for the next text at
most until N seconds after the last one's send time (whole seconds, so never longer than N after the customer
actually sent it), looking at the inbox every `poll_s`: nothing sleeps past the window.

A reset or handoff word is never merged: the burst stops before it, so it acts on its own once the texts
before it are answered. Anything but a non-empty text (an image, a file, an event) stops the burst too; an
image followed by a text keeps its pairing (the drain pairs them first, then merges the texts that follow).

Each merged message is claimed for this instance before it joins (the drain renews the claims and marks every
one done afterwards), so across instances and restarts a message is answered exactly once: a claim another
instance holds ends the burst, and an instance that dies mid-merge leaves claims that expire, after which the
next drain merges the pending messages again. The answer is the last message's: its msgid names the replies
and its quota (WeCom renews the 5-reply quota with every customer message) pays for them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Protocol

from application.ports import Clock, Inbox, MessageHandling
from application.telemetry import Telemetry
from domain.commands import CommandSet
from domain.dedupe import DedupeKey
from domain.messages import InboundMessage, Kind

log = logging.getLogger("kfdify.merge")

# While waiting for the next text of a burst, look at the inbox this often.
MERGE_POLL_S = 0.2


class MergeStore(Inbox, MessageHandling, Protocol):
    """What merging needs of the state store: the customer's inbox and claims on messages."""


def merged_question(burst: list[InboundMessage]) -> InboundMessage:
    """One question from a burst: the last message, carrying every text in order, one per line."""
    if len(burst) == 1:
        return burst[0]
    return replace(burst[-1], text="\n".join(m.text for m in burst))


class MergeWindow:
    def __init__(
        self,
        *,
        store: MergeStore,
        clock: Clock,
        telemetry: Telemetry,
        commands: CommandSet,
        owner: str,
        window_s: float,
        lease_s: float,
        poll_s: float = MERGE_POLL_S,
    ) -> None:
        self._store = store
        self._clock = clock
        self._telemetry = telemetry
        self._commands = commands
        self._owner = owner
        self._window_s = window_s
        self._lease_s = lease_s
        self._poll_s = poll_s

    @property
    def enabled(self) -> bool:
        return self._window_s > 0

    async def gather(
        self, first: InboundMessage, claimed: list[tuple[InboundMessage, DedupeKey]]
    ) -> InboundMessage:
        """The question to ask for `first` (claimed by the caller): `first` itself, or the burst it starts,
        merged. Every message merged is claimed and appended to `claimed` as soon as it joins, so the
        caller renews its lease, completes it, or releases it on shutdown like `first`."""
        if not self.enabled or not self._mergeable(first):
            return first
        burst = [first]
        try:
            await self._extend(burst, claimed)
        except Exception:
            # The store failed (Memcached down): answer what is gathered; the rest is answered on its own.
            log.exception("merging the texts after msgid=%s failed", burst[-1].msgid)
        if len(burst) > 1:
            self._telemetry.count("merged_messages", len(burst) - 1)
            log.info("%d messages asked as one: %s", len(burst), ",".join(m.msgid for m in burst))
        return merged_question(burst)

    async def _extend(
        self, burst: list[InboundMessage], claimed: list[tuple[InboundMessage, DedupeKey]]
    ) -> None:
        """Claim and append the texts that follow the burst, waiting for them until the window closes."""
        started = int(self._clock.now())  # send_time is whole seconds
        while True:
            last = burst[-1]
            follower = await self._next_pending(last)
            if follower is not None:
                if not self._joins(last, follower, started):
                    return
                # claim() fails for anything but a NEW message nobody holds: another instance has it.
                if not await self._store.claim(follower, owner=self._owner, lease_s=self._lease_s):
                    return
                claimed.append((follower, DedupeKey.for_message(follower)))
                burst.append(follower)
                continue
            remaining = last.send_time + self._window_s - self._clock.now()
            if remaining <= 0:
                return
            await asyncio.sleep(min(self._poll_s, remaining))

    def _mergeable(self, message: InboundMessage) -> bool:
        """A non-empty text that is not a command."""
        if message.kind is not Kind.TEXT or not message.text.strip():
            return False
        return self._commands.parse(message.text) is None

    def _joins(self, last: InboundMessage, follower: InboundMessage, started: int) -> bool:
        if not self._mergeable(follower):
            return False  # a command acts alone, after the burst; an image or a file is its own question
        return follower.send_time - last.send_time <= self._window_s or follower.send_time >= started

    async def _next_pending(self, last: InboundMessage) -> InboundMessage | None:
        pending = await self._store.pending(last.customer)
        for index, message in enumerate(pending):
            if message.msgid == last.msgid:
                return pending[index + 1] if index + 1 < len(pending) else None
        return None
