"""Slow down guessing of the admin token: per client address, failures lead to growing lockouts.

`THRESHOLD` failures within `WINDOW_S` lock the address out for `BASE_LOCKOUT_S`; each further failure
after a lockout (before the address has stayed clean for `FORGET_S`) locks it again for twice as long, up
to `MAX_LOCKOUT_S`. A locked address is refused without its token being looked at (429, Retry-After). A
success clears only that address's record. At most `max_addresses` records are kept (the least recently
seen goes first), so a flood of addresses costs bounded memory.

Behind a reverse proxy every client has the proxy's address: then the lockout is shared by all operators,
which is the safe side (the admin API is for a few people; see README "Security").
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

THRESHOLD: Final = 5
WINDOW_S: Final = 60.0
BASE_LOCKOUT_S: Final = 30.0
MAX_LOCKOUT_S: Final = 900.0
FORGET_S: Final = 3600.0
MAX_ADDRESSES: Final = 10_000


@dataclass(slots=True)
class _Record:
    failures: list[float] = field(default_factory=list)  # times of recent failures, at most THRESHOLD
    strikes: int = 0  # lockouts so far
    locked_until: float = 0.0
    last_failure: float = 0.0


class FailedAuthThrottle:
    def __init__(
        self,
        *,
        threshold: int = THRESHOLD,
        window_s: float = WINDOW_S,
        base_lockout_s: float = BASE_LOCKOUT_S,
        max_lockout_s: float = MAX_LOCKOUT_S,
        forget_s: float = FORGET_S,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or max_addresses < 1 or base_lockout_s <= 0 or max_lockout_s < base_lockout_s:
            raise ValueError("threshold and max_addresses must be ≥ 1, lockouts positive and base ≤ max")
        self._threshold = threshold
        self._window = window_s
        self._base = base_lockout_s
        self._max = max_lockout_s
        self._forget = forget_s
        self._max_addresses = max_addresses
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def retry_after(self, address: str) -> int:
        """Whole seconds until `address` may try again (0: it may try now)."""
        record = self._records.get(address)
        if record is None:
            return 0
        remaining = record.locked_until - self._clock()
        return math.ceil(remaining) if remaining > 0 else 0

    def failed(self, address: str) -> int:
        """Record a failed attempt; the lockout it starts, in whole seconds (0: none)."""
        now = self._clock()
        record = self._records.get(address)
        if record is None or (record.last_failure and now - record.last_failure > self._forget):
            record = _Record()
        self._records[address] = record
        self._records.move_to_end(address)
        while len(self._records) > self._max_addresses:
            self._records.popitem(last=False)
        record.last_failure = now
        record.failures = [t for t in record.failures if now - t < self._window][-(self._threshold - 1) :]
        record.failures.append(now)
        if record.strikes == 0 and len(record.failures) < self._threshold:
            return 0
        lockout = min(self._base * 2.0 ** min(record.strikes, 30), self._max)
        record.strikes += 1
        record.failures = []
        record.locked_until = now + lockout
        return math.ceil(lockout)

    def succeeded(self, address: str) -> None:
        self._records.pop(address, None)
