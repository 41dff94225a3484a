"""Answer a customer's recorded messages in the order they were sent, each exactly once across instances.

An image followed within a few seconds by a text from the same customer is one question (the text, with the
image attached): customers send a screenshot, then ask about it. The drain claims the image, waits up to
`image_text_window_s` for the text to be pulled, claims the text too, and answers once. The replies count
against the text's quota (WeCom renews the quota of 5 with every customer message, so the newest one has
the full quota) and are named after the text's msgid; both messages are then marked done.
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum
from typing import Protocol

from application.answer_message import AnswerCustomerMessage
from application.log_context import handling
from application.media_port import ImagePairing
from application.merge_window import MergeWindow
from application.options import BotOptions
from application.ports import Clock, Inbox, MessageHandling, MessageLedger, MessageState
from application.telemetry import Telemetry
from domain.commands import CommandSet
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage, Kind

log = logging.getLogger("kfdify.drain")

# While waiting for the text that may follow an image, look at the inbox this often.
PAIRING_POLL_S = 0.2
# send_time is whole seconds, and the text still needs a callback and a pull to reach the inbox.
PAIRING_GRACE_S = 1.0


class DrainOutcome(StrEnum):
    EMPTY = "empty"  # nothing left for this customer
    WAITING = "waiting"  # another instance holds the customer's oldest pending message: keep order, wait


class DrainStore(Inbox, MessageLedger, MessageHandling, Protocol):
    """What the drain needs of the state store: the customer's inbox and who handles which message."""


class DrainCustomer:
    def __init__(
        self,
        *,
        store: DrainStore,
        answer: AnswerCustomerMessage,
        options: BotOptions,
        telemetry: Telemetry,
        owner: str,
        clock: Clock,
        pairing: ImagePairing,
    ) -> None:
        self._store = store
        self._answer = answer
        self._options = options
        self._telemetry = telemetry
        self._owner = owner
        self._clock = clock
        self._pairing = pairing
        self._commands = CommandSet.of(reset=options.reset_words, handoff=options.handoff_words)
        # A burst of texts is one question (merge_window.py); off while `merge_window_s` is 0.
        self._merge = MergeWindow(
            store=store,
            clock=clock,
            telemetry=telemetry,
            commands=self._commands,
            owner=owner,
            window_s=options.merge_window_s,
            lease_s=options.message_lease_s,
        )

    async def __call__(self, customer: CustomerRef) -> DrainOutcome:
        # Each removal hands back what is still pending: the inbox is read once per drain, not per message.
        pending = await self._store.pending(customer)
        while pending:
            message = pending[0]
            key = DedupeKey.for_message(message)
            # Claim first: True only for a NEW message nobody holds, so the state is only read when the claim
            # fails (done already, or another instance holds it).
            if await self._store.claim(message, owner=self._owner, lease_s=self._options.message_lease_s):
                pending = await self._handle(message, key)
                continue
            if await self._store.state(key) is not MessageState.DONE:
                return DrainOutcome.WAITING
            self._telemetry.count("deduplicated")
            pending = await self._store.remove(customer, message.msgid)
        return DrainOutcome.EMPTY

    async def _handle(self, message: InboundMessage, key: DedupeKey) -> list[InboundMessage]:
        """Answer the claimed message; returns the customer's messages still pending afterwards."""
        with handling(message):  # every log line from here on names the message
            return await self._answer_claimed(message, key)

    async def _answer_claimed(self, message: InboundMessage, key: DedupeKey) -> list[InboundMessage]:
        claimed: list[tuple[InboundMessage, DedupeKey]] = [(message, key)]
        renewer = asyncio.create_task(self._keep_leases(claimed))
        self._telemetry.in_flight += 1
        try:
            try:
                text = await self._following_text(message)
                if text is not None:
                    claimed.append((text, DedupeKey.for_message(text)))
                    self._telemetry.count("image_text_pairs")
                    log.info("image and text msgid=%s asked together", text.msgid)
                    question = await self._merge.gather(text, claimed)
                    with handling(question):  # the question (and its replies) is the (last) text's
                        outcome = await self._answer(question, attached=(message,))
                else:
                    question = await self._merge.gather(message, claimed)
                    with handling(question):
                        outcome = await self._answer(question)
                self._telemetry.count_labelled("outcomes", outcome.value)
            except asyncio.CancelledError:
                # Shutting down: hand the messages back so another instance (or our restart) answers them.
                for _, claimed_key in claimed:
                    await asyncio.shield(self._store.release(claimed_key, owner=self._owner))
                raise
            except Exception:
                # A bug must neither kill the worker nor make the message come back forever.
                log.exception("answering failed unexpectedly")
                self._telemetry.count("internal_errors")
            remaining: list[InboundMessage] = []
            for done, _ in claimed:
                remaining = await self._store.complete(done)  # DONE first, then out of the inbox
            return remaining
        finally:
            self._telemetry.in_flight -= 1
            renewer.cancel()

    async def _following_text(self, image: InboundMessage) -> InboundMessage | None:
        """The customer's text that follows `image` within the window, claimed for this owner; None when
        there is none (or the image should not wait for one)."""
        window = self._options.image_text_window_s
        if window <= 0 or image.kind is not Kind.IMAGE:
            return None
        try:
            if not await self._pairing.awaits_text(image):
                return None
        except Exception:
            log.exception("deciding whether the image waits for a text failed")
            return None
        age = max(self._clock.now() - image.send_time, 0.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(window + min(PAIRING_GRACE_S, window) - age, 0.0)
        while True:
            follower = await self._next_pending(image)
            if follower is not None:
                return await self._claim_if_pairs(image, follower)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(PAIRING_POLL_S, remaining))

    async def _next_pending(self, image: InboundMessage) -> InboundMessage | None:
        pending = await self._store.pending(image.customer)
        for index, message in enumerate(pending):
            if message.msgid == image.msgid:
                return pending[index + 1] if index + 1 < len(pending) else None
        return None

    async def _claim_if_pairs(self, image: InboundMessage, follower: InboundMessage) -> InboundMessage | None:
        if follower.kind is not Kind.TEXT or not follower.text.strip():
            return None
        if follower.send_time - image.send_time > self._options.image_text_window_s:
            return None
        if self._commands.parse(follower.text) is not None:
            return None  # a reset or handoff is a command, not a question about the image
        # claim() fails for anything but a NEW message nobody holds: no separate state() read.
        if not await self._store.claim(follower, owner=self._owner, lease_s=self._options.message_lease_s):
            return None
        return follower

    async def _keep_leases(self, claimed: list[tuple[InboundMessage, DedupeKey]]) -> None:
        """Renew the leases while Dify thinks, so a slow answer is not mistaken for a dead instance."""
        interval = max(self._options.message_lease_s / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            for _, key in list(claimed):
                try:
                    await self._store.renew(key, owner=self._owner, lease_s=self._options.message_lease_s)
                except Exception:
                    log.exception("renewing the lease of msgid=%s failed", key.msgid)
