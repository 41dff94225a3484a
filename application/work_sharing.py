"""How several instances share the customers waiting in one kf account's inbox.

The instance that holds a kf account's pull lease records what it pulled in the shared inbox; every instance
may answer it. Each instance takes customers only while it has room (`DrainRoom`), so the puller does not
hog a burst: what it cannot start yet stays visible in the inbox for the others. An instance looks at the
inbox (`Inbox.customers_with_pending`) after its own pull, when a callback arrives while another instance
pulls, and at the recovery pass; while customers are left that it had no room for, it looks again as its
drains finish (at most every `SCAN_INTERVAL_S`), and it lingers `SCAN_LINGER_S` after the last customer it
took, because the puller may still be recording pages. A look reads nothing while the instance has no room,
and it does not read the inboxes of the customers it would skip anyway (drained here already, or busy
elsewhere): during a burst, reading every waiting customer's inbox every 0.2 s to take a handful was most of
a look's cost.

Exactly once and order need nothing new: a drain claims a customer's messages one at a time in send order
(`application/drain_customer.py`), and a claim succeeds on exactly one instance. A drain that finds the
customer's oldest message claimed by another instance stops (that instance goes on with the customer's next
messages), and the customer is looked at again after a back-off (`BusyElsewhere`), in case that instance
died and its lease expires.
"""

from __future__ import annotations

import math
from typing import Protocol

from domain.messages import CustomerRef

# Scans of one kf account's inbox start at least this far apart (per instance).
SCAN_INTERVAL_S = 0.2
# After a scan that found nothing to take, keep looking this long: the puller may still be recording pages.
SCAN_LINGER_S = 1.0
# A customer whose oldest message another instance holds is looked at again after this back-off (growing).
# That instance goes on with the customer's next messages itself; looking again only matters if it died, and
# its claim's lease outlasts this anyway. Shorter (0.5 s) made each customer in a burst cost the other
# instance two or three drains that found them busy (store round trips for nothing) while Dify answered.
ELSEWHERE_FIRST_S = 2.0
ELSEWHERE_MAX_S = 5.0
# Another instance seen this recently answers the same kf account: a look takes at most half of what waits.
OTHERS_SEEN_S = 5.0
# ... but never fewer than this many customers at once (a burst's tail is not split into crumbs).
FAIR_SHARE_FLOOR = 64


class Capacity(Protocol):
    """The answering side's room (e.g. the adaptive Dify limiter)."""

    def has_room(self) -> bool:
        """Whether one more question would be asked at once now (nobody waits, a slot is free)."""
        ...

    def room(self) -> int:
        """How many questions this instance may have open at once now (the current limit)."""
        ...


class DrainRoom:
    """How many customers this instance drains at once: at most `max_drains` (0: no limit), at most the
    answering side's current `room()` (its limit grows as the app proves it can take more), and none more
    while `capacity` says a question would wait.

    Counting drains, not questions in flight, matters when a burst arrives: the customers of a pulled page
    are offered in one go, before any of them has asked, so a gauge of questions in flight would still say
    "room" after the thousandth and one instance would take the whole burst."""

    def __init__(self, *, max_drains: int = 0, capacity: Capacity | None = None) -> None:
        self._max_drains = max(max_drains, 0)
        self._capacity = capacity

    @property
    def limited(self) -> bool:
        return bool(self._max_drains) or self._capacity is not None

    def has_room(self, draining: int) -> bool:
        if self._max_drains and draining >= self._max_drains:
            return False
        if self._capacity is None:
            return True
        try:
            return draining < self._capacity.room() and self._capacity.has_room()
        except Exception:
            return draining == 0  # a broken gauge must not stop all work


class OtherInstances:
    """Whether other instances answer a kf account's customers too, and so what share of the customers waiting
    one look takes. An instance that leads a burst (its limiter grew first, because its pull came first)
    would otherwise take nearly all of it: while another instance was seen in the last `OTHERS_SEEN_S`
    (holding the pull lease, asking for a pull while this one pulled, or holding a customer's message), a
    look takes at most half of the customers it could take, and no more than brings this instance to half of
    all the customers pending (as if the others were one), but never fewer than `FAIR_SHARE_FLOOR`, so a
    burst's tail is not held back. Alone, an instance takes all it has room for."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def seen(self, open_kfid: str, *, now: float) -> None:
        self._seen[open_kfid] = now

    def share(self, open_kfid: str, waiting: int, *, now: float, pending: int = 0, mine: int = 0) -> int:
        """How many of `waiting` customers to take. `pending`: all the kf account's customers with messages
        (waiting, or being answered here or elsewhere), `mine`: those being answered here; beyond half of
        `pending`, this instance leaves the rest to the others."""
        seen = self._seen.get(open_kfid)
        if seen is None or now - seen > OTHERS_SEEN_S:
            return waiting
        share = math.ceil(waiting / 2)
        if pending:
            share = min(share, math.ceil(pending / 2) - mine)
        return max(share, FAIR_SHARE_FLOOR)


class BusyElsewhere:
    """Customers whose oldest pending message another instance holds: skipped by scans until their recheck
    time, which backs off from `ELSEWHERE_FIRST_S` to `ELSEWHERE_MAX_S` while they stay busy elsewhere."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._until: dict[CustomerRef, tuple[float, float]] = {}  # customer → (recheck at, back-off)
        self._max_entries = max_entries

    def note(self, customer: CustomerRef, *, now: float) -> None:
        _, previous = self._until.get(customer, (0.0, 0.0))
        backoff = min(max(previous * 2, ELSEWHERE_FIRST_S), ELSEWHERE_MAX_S)
        if len(self._until) >= self._max_entries and customer not in self._until:
            self._until = {c: u for c, u in self._until.items() if u[0] > now}
        self._until[customer] = (now + backoff, backoff)

    def clear(self, customer: CustomerRef) -> None:
        self._until.pop(customer, None)

    def skips(self, customer: CustomerRef, *, now: float) -> bool:
        entry = self._until.get(customer)
        return entry is not None and entry[0] > now

    def skipped(self, open_kfid: str, *, now: float) -> list[CustomerRef]:
        """This kf account's customers that `skips` now."""
        return [c for c, (at, _) in self._until.items() if c.open_kfid == open_kfid and at > now]

    def next_recheck(self, open_kfid: str, pending: set[CustomerRef]) -> float | None:
        """The earliest recheck time among this kf account's customers still pending; forgets the others."""
        earliest: float | None = None
        for customer in [c for c in self._until if c.open_kfid == open_kfid]:
            if customer not in pending:
                del self._until[customer]
                continue
            at = self._until[customer][0]
            earliest = at if earliest is None else min(earliest, at)
        return earliest
