"""Answer a customer's recorded messages in the order they were sent, each exactly once across instances."""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum

from application.answer_message import AnswerCustomerMessage
from application.options import BotOptions
from application.ports import MessageState, StateStore
from application.telemetry import Telemetry
from domain.dedupe import DedupeKey
from domain.messages import CustomerRef, InboundMessage

log = logging.getLogger("kfdify.drain")


class DrainOutcome(StrEnum):
    EMPTY = "empty"  # nothing left for this customer
    WAITING = "waiting"  # another instance holds the customer's oldest pending message: keep order, wait


class DrainCustomer:
    def __init__(
        self,
        *,
        store: StateStore,
        answer: AnswerCustomerMessage,
        options: BotOptions,
        telemetry: Telemetry,
        owner: str,
    ) -> None:
        self._store = store
        self._answer = answer
        self._options = options
        self._telemetry = telemetry
        self._owner = owner

    async def __call__(self, customer: CustomerRef) -> DrainOutcome:
        while True:
            pending = await self._store.pending(customer)
            if not pending:
                return DrainOutcome.EMPTY
            message = pending[0]
            key = DedupeKey.for_message(message)
            state = await self._store.state(key)
            if state is MessageState.DONE:
                self._telemetry.count("deduplicated")
                await self._store.remove(customer, message.msgid)
                continue
            if state is MessageState.BUSY or not await self._store.begin(
                key, owner=self._owner, lease_s=self._options.message_lease_s
            ):
                return DrainOutcome.WAITING
            await self._handle(message, key)

    async def _handle(self, message: InboundMessage, key: DedupeKey) -> None:
        renewer = asyncio.create_task(self._keep_lease(key))
        self._telemetry.in_flight += 1
        try:
            try:
                outcome = await self._answer(message)
                self._telemetry.count_labelled("outcomes", outcome.value)
            except asyncio.CancelledError:
                # Shutting down: hand the message back so another instance (or our restart) answers it.
                await asyncio.shield(self._store.release(key, owner=self._owner))
                raise
            except Exception:
                # A bug must neither kill the worker nor make the message come back forever.
                log.exception(
                    "answering msgid=%s kf=%s failed unexpectedly", message.msgid, message.open_kfid
                )
                self._telemetry.count("internal_errors")
            await self._store.finish(key)
            await self._store.remove(message.customer, message.msgid)
        finally:
            self._telemetry.in_flight -= 1
            renewer.cancel()

    async def _keep_lease(self, key: DedupeKey) -> None:
        """Renew the lease while Dify thinks, so a slow answer is not mistaken for a dead instance."""
        interval = max(self._options.message_lease_s / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._store.renew(key, owner=self._owner, lease_s=self._options.message_lease_s)
            except Exception:
                log.exception("renewing the lease of msgid=%s failed", key.msgid)
