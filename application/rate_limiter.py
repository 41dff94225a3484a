"""Per-customer rate limit (the rule is domain/rate_limit.py), counted for all instances together.

Without shared counters (the in-process store: one instance) the windows live in this instance's memory and
the rule is applied exactly: `limit` answered messages in any sliding window of `window_s`.

With shared counters (`CustomerCounters` on Memcached) every instance counts into the same per-customer
counters, so N instances allow the limit, not N × the limit. The window is then approximated the usual way
for counters: fixed slots of `window_s`, and a message is admitted while `count in this slot + the previous
slot's count × the part of it still inside the sliding window` stays within the limit. Each admission is an
atomic `increment` (whose result decides: concurrent messages on several instances each see their own
count, so never more than the limit are admitted at once), and a refused message is taken back. The notice
goes out once per window across instances: the first refusal adds a note that lives `window_s`. After a
full burst, the approximation may admit a message a little before the oldest one truly left the window
(never more than the limit within one slot).

When the shared store fails (only possible without the failover wrapper), this instance falls back to its
own windows: answers never wait for the store.
"""

from __future__ import annotations

import logging
import math

from application.ports import Clock, CustomerCounters, CustomerNotes
from domain.messages import CustomerRef
from domain.rate_limit import RateDecision, RateLimit, RateWindow, admit

log = logging.getLogger("kfdify.rate")

NOTICE_TOPIC = "rate-notice"


class CustomerRateLimiter:
    def __init__(
        self,
        *,
        rule: RateLimit,
        clock: Clock,
        max_customers: int = 100_000,
        counters: CustomerCounters | None = None,
        notes: CustomerNotes | None = None,
    ) -> None:
        self._rule = rule
        self._clock = clock
        self._max_customers = max_customers
        self._windows: dict[CustomerRef, RateWindow] = {}
        self._counters = counters
        self._notes = notes
        self._shared_failed = False

    @property
    def rule(self) -> RateLimit:
        return self._rule

    @property
    def shared(self) -> bool:
        """True when the count is shared by all instances."""
        return self._counters is not None and self._notes is not None

    async def admit(self, customer: CustomerRef) -> RateDecision:
        """Count one message of `customer` and decide about it, across all instances when shared."""
        if not self._rule.enabled:
            return RateDecision.ALLOW
        if self._counters is None or self._notes is None:
            return self.check(customer)
        try:
            decision = await self._admit_shared(customer, self._counters, self._notes)
        except Exception as exc:
            if not self._shared_failed:
                log.warning("shared rate counters unavailable, counting in this instance: %s", exc)
            self._shared_failed = True
            return self.check(customer)
        self._shared_failed = False
        return decision

    def check(self, customer: CustomerRef) -> RateDecision:
        """Count one message of `customer` in this instance's own windows and decide about it."""
        if not self._rule.enabled:
            return RateDecision.ALLOW
        now = self._clock.now()
        if len(self._windows) >= self._max_customers and customer not in self._windows:
            self._prune(now)
        decision, window = admit(self._windows.get(customer, RateWindow()), now=now, rule=self._rule)
        self._windows[customer] = window
        return decision

    async def _admit_shared(
        self, customer: CustomerRef, counters: CustomerCounters, notes: CustomerNotes
    ) -> RateDecision:
        window_s = self._rule.window_s
        now = self._clock.now()
        slot = math.floor(now / window_s)
        inside = 1.0 - (now - slot * window_s) / window_s  # share of the previous slot still in the window
        current = f"rate:{slot}"
        # Two slots must be readable: a counter lives two windows (and a second of memcached clock tick).
        count = await counters.increment(customer, current, ttl_s=2 * window_s + 1)
        (previous,) = await counters.counts(customer, [f"rate:{slot - 1}"])
        if count + previous * inside <= self._rule.limit:
            return RateDecision.ALLOW
        await counters.decrement(customer, current)  # refused messages do not count
        first = await notes.add_note(customer, NOTICE_TOPIC, str(now), ttl_s=window_s)
        return RateDecision.NOTIFY if first else RateDecision.DROP

    def _prune(self, now: float) -> None:
        window_s = self._rule.window_s
        self._windows = {c: w for c, w in self._windows.items() if not w.is_idle(now=now, window_s=window_s)}
