"""Customers who refused our messages (`msg_send_fail` with fail_type 10).

While remembered, they get no proactive texts (welcome, interim) and failed sends to them are not
retried. Their own next message clears it.

Shared through the store when `notes` (`CustomerNotes`) is given: the instance that sees the event writes the
customer's "refused" note (in the background, for `memory_s`), and `refusing()` on any instance reads it, at
most once per `shared_check_s` (2 s) per customer; a message that lifts the refusal deletes the note for all.
Without notes (or while the store fails) it is this instance's memory alone, as `applies()` is.
"""

from __future__ import annotations

import json
import logging

from application.ports import Clock, CustomerNotes
from application.shared_notes import NoteWriter
from domain.delivery import Rejection
from domain.messages import CustomerRef

log = logging.getLogger("kfdify.rejections")

DEFAULT_MEMORY_S = 24 * 3600.0
DEFAULT_SHARED_CHECK_S = 2.0
REFUSED_TOPIC = "refused"


class RejectedCustomers:
    def __init__(
        self,
        *,
        clock: Clock,
        memory_s: float = DEFAULT_MEMORY_S,
        max_customers: int = 100_000,
        notes: CustomerNotes | None = None,
        shared_check_s: float = DEFAULT_SHARED_CHECK_S,
    ) -> None:
        self._clock = clock
        self._memory_s = memory_s
        self._max_customers = max_customers
        self._rejections: dict[CustomerRef, Rejection] = {}
        self._notes = notes
        self._writer = NoteWriter(notes) if notes is not None else None
        self._shared_check_s = shared_check_s
        self._checked: dict[CustomerRef, float] = {}

    @property
    def writer(self) -> NoteWriter | None:
        """The background writer of shared notes (None when not shared)."""
        return self._writer

    def remember(self, customer: CustomerRef, *, at: float) -> None:
        now = self._clock.now()
        if len(self._rejections) >= self._max_customers and customer not in self._rejections:
            self._rejections = {c: r for c, r in self._rejections.items() if r.applies(now=now)}
        rejection = self._rejections[customer] = Rejection(at=at, until=now + self._memory_s)
        if self._writer is not None:
            note = json.dumps({"at": rejection.at, "until": rejection.until}, separators=(",", ":"))
            self._writer.put(customer, REFUSED_TOPIC, note, ttl_s=self._memory_s)

    def applies(self, customer: CustomerRef, *, message_time: float | None = None) -> bool:
        """True while `customer` refuses our messages, as far as this instance knows. A message they sent
        after refusing clears it."""
        rejection = self._rejections.get(customer)
        if rejection is None:
            return False
        if rejection.applies(now=self._clock.now(), message_time=message_time):
            return True
        del self._rejections[customer]
        if message_time is not None and self._writer is not None:
            self._writer.delete(customer, REFUSED_TOPIC)
        return False

    async def refusing(self, customer: CustomerRef, *, message_time: float | None = None) -> bool:
        """`applies()`, with what the other instances noted (read at most once per `shared_check_s`)."""
        if self._notes is not None:
            await self._read_shared(customer, self._notes)
        return self.applies(customer, message_time=message_time)

    async def _read_shared(self, customer: CustomerRef, notes: CustomerNotes) -> None:
        now = self._clock.now()
        checked = self._checked.get(customer)
        if checked is not None and now - checked < self._shared_check_s:
            return
        try:
            raw = (await notes.get_notes(customer, [REFUSED_TOPIC])).get(REFUSED_TOPIC)
        except Exception as exc:
            log.debug("reading the shared refusal note failed, using this instance's: %s", exc)
            return
        if len(self._checked) >= self._max_customers:
            self._checked = {c: t for c, t in self._checked.items() if now - t < self._shared_check_s}
        self._checked[customer] = now
        shared = _decode(raw) if raw is not None else None
        local = self._rejections.get(customer)
        if shared is None:
            if local is not None and (self._writer is None or not self._writer.pending):
                del self._rejections[customer]  # lifted (or expired) elsewhere
            return
        if local is None or shared.at >= local.at:
            self._rejections[customer] = shared


def _decode(raw: str) -> Rejection | None:
    try:
        data = json.loads(raw)
        return Rejection(at=float(data["at"]), until=float(data["until"]))
    except (ValueError, TypeError, KeyError):
        return None
