"""Fair use: how many messages one customer may have answered in a sliding window, and when to say so.

Over the limit the customer gets one polite notice per window, and the excess messages are not answered.
Refused messages do not count against the window: a customer who keeps writing is answered again as soon
as the older answered messages slide out of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class RateDecision(StrEnum):
    ALLOW = "allow"  # answer it
    NOTIFY = "notify"  # over the limit: send the notice, do not answer
    DROP = "drop"  # over the limit, the notice already went out this window: stay quiet


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`limit` messages per `window_s` seconds; a limit of 0 turns it off."""

    limit: int
    window_s: float

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.window_s > 0


@dataclass(frozen=True, slots=True)
class RateWindow:
    """One customer's recent answered messages (Unix seconds, oldest first) and the last notice."""

    stamps: tuple[float, ...] = ()
    notified_at: float | None = None

    def is_idle(self, *, now: float, window_s: float) -> bool:
        """Nothing in it still matters: it can be forgotten."""
        recent = bool(self.stamps) and now - self.stamps[-1] < window_s
        noticed = self.notified_at is not None and now - self.notified_at < window_s
        return not recent and not noticed


def admit(window: RateWindow, *, now: float, rule: RateLimit) -> tuple[RateDecision, RateWindow]:
    """Decide about one more message at `now`; returns the decision and the updated window."""
    if not rule.enabled:
        return RateDecision.ALLOW, window
    stamps = tuple(s for s in window.stamps if now - s < rule.window_s)
    if len(stamps) < rule.limit:
        return RateDecision.ALLOW, replace(window, stamps=(*stamps, now))
    if window.notified_at is None or now - window.notified_at >= rule.window_s:
        return RateDecision.NOTIFY, RateWindow(stamps, notified_at=now)
    return RateDecision.DROP, replace(window, stamps=stamps)
