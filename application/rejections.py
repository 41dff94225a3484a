"""Customers who refused our messages (`msg_send_fail` with fail_type 10), remembered by this instance.

While remembered, they get no proactive texts (welcome, interim) and failed sends to them are not
retried. Their own next message clears it. Per instance, like the session cache: the instance that pulls
the kf account sees the event and normally answers the customer too.
"""

from __future__ import annotations

from application.ports import Clock
from domain.delivery import Rejection
from domain.messages import CustomerRef

DEFAULT_MEMORY_S = 24 * 3600.0


class RejectedCustomers:
    def __init__(
        self, *, clock: Clock, memory_s: float = DEFAULT_MEMORY_S, max_customers: int = 100_000
    ) -> None:
        self._clock = clock
        self._memory_s = memory_s
        self._max_customers = max_customers
        self._rejections: dict[CustomerRef, Rejection] = {}

    def remember(self, customer: CustomerRef, *, at: float) -> None:
        now = self._clock.now()
        if len(self._rejections) >= self._max_customers and customer not in self._rejections:
            self._rejections = {c: r for c, r in self._rejections.items() if r.applies(now=now)}
        self._rejections[customer] = Rejection(at=at, until=now + self._memory_s)

    def applies(self, customer: CustomerRef, *, message_time: float | None = None) -> bool:
        """True while `customer` refuses our messages. A message they sent after refusing clears it."""
        rejection = self._rejections.get(customer)
        if rejection is None:
            return False
        if rejection.applies(now=self._clock.now(), message_time=message_time):
            return True
        del self._rejections[customer]
        return False
