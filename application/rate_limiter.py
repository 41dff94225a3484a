"""Per-customer rate limit, kept in this instance's memory (the rule is domain/rate_limit.py).

Per instance: with several instances behind one callback URL each counts the messages it answers, so a
customer may get up to N × the limit in the worst case. A customer's messages are normally drained by the
instance that pulled them, which keeps the count close in practice.
"""

from __future__ import annotations

from application.ports import Clock
from domain.messages import CustomerRef
from domain.rate_limit import RateDecision, RateLimit, RateWindow, admit


class CustomerRateLimiter:
    def __init__(self, *, rule: RateLimit, clock: Clock, max_customers: int = 100_000) -> None:
        self._rule = rule
        self._clock = clock
        self._max_customers = max_customers
        self._windows: dict[CustomerRef, RateWindow] = {}

    @property
    def rule(self) -> RateLimit:
        return self._rule

    def check(self, customer: CustomerRef) -> RateDecision:
        """Count one message of `customer` and decide about it."""
        if not self._rule.enabled:
            return RateDecision.ALLOW
        now = self._clock.now()
        if len(self._windows) >= self._max_customers and customer not in self._windows:
            self._prune(now)
        decision, window = admit(self._windows.get(customer, RateWindow()), now=now, rule=self._rule)
        self._windows[customer] = window
        return decision

    def _prune(self, now: float) -> None:
        window_s = self._rule.window_s
        self._windows = {c: w for c, w in self._windows.items() if not w.is_idle(now=now, window_s=window_s)}
