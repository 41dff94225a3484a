"""How many Dify calls run at once toward each Dify app.

A fixed number is wrong both ways: too low for a Dify deployment that could take more (customers wait in
our queue while Dify idles), too high for one that cannot (Dify answers 429 and customers get the fallback
text). `AdaptiveLimiter` learns each app's capacity from what the app answers:

- It grows while answers come back and the limit is actually used: slow start first (an accepted request
  that was sent with k calls in flight lets the limit reach 2k, so it doubles every round trip, like
  TCP's slow start), then +1 per round trip (+1/limit per answer) once an overload was seen. A Dify
  answer takes seconds, but Dify accepts or refuses a request at once (its per-app concurrency check
  runs before the stream starts, docs/dify.md §8.1), so callers that report `Slot.accepted()` when the
  answer starts let a burst reach a thousand calls within about a second; without it the limit
  doubles once per answer time.
- It shrinks on explicit overload signals (429, 502/503, connection refused, timeouts; see
  application/dify_retry.py): ×0.7, once per overload episode. Only a request granted after the last
  decrease can cause the next one, so the 50 rejections of one overshoot count as one decrease.
- Latency only stops growth: when the recent median answer time exceeds twice the long-run median. LLM
  latency mostly depends on the question, not on load, so it is a weak overload signal.

Waiting callers are served fairly: round robin across customers, in the order each customer's turn came
up, each customer's own requests in their order. A customer with fifty waiting messages delays nobody.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from urllib.parse import urlsplit

from application.dify_retry import Overload, is_quota_exhausted, overload_of
from application.errors import ChatEngineError
from application.fair_queue import FairQueue
from application.ports import Clock


def dify_app_key(base_url: str, api_key: str) -> str:
    """A name for one Dify app that is safe to show (/status, logs): host plus a fingerprint of the key."""
    host = urlsplit(base_url).netloc or base_url
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\n{api_key}".encode()).hexdigest()[:10]
    return f"{host}#{digest}"


# --- Adaptive limiter -------------------------------------------------------------------------------

# While an app is in slow start, an instance that shares a burst takes on this many times its limit.
SLOW_START_ROOM = 4


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    # Bounds of the number of Dify calls in flight per app ([BOT] DIFY_CONCURRENCY, DIFY_MIN_CONCURRENCY).
    max_limit: int = 1000
    min_limit: int = 4
    initial_limit: int = 32
    # Multiplicative decrease on an overload episode.
    backoff_ratio: float = 0.7
    # ... on a 429 (the app's concurrency cap): the cap is known to lie just below what was in flight when
    # the refused call was sent, so the limit goes a little below that instead of a third down.
    rate_limited_ratio: float = 0.9
    # The limit counts as used (so it may grow) when someone waits or in-flight reaches this share of it.
    used_ratio: float = 0.9
    # Growth stops while the recent median latency exceeds this multiple of the long-run median.
    latency_tolerance: float = 2.0
    short_window: int = 16
    long_window: int = 256
    min_long_samples: int = 32
    # After this long (clock seconds) without any overload, slow start may run again; 0 = never.
    slow_start_restart_s: float = 300.0

    @classmethod
    def from_config(cls, *, concurrency: int, min_concurrency: int, initial: int = 32) -> LimiterSettings:
        """From `[BOT] DIFY_CONCURRENCY` (ceiling) and `DIFY_MIN_CONCURRENCY` (floor): a ceiling set below
        the floor wins (an operator who writes DIFY_CONCURRENCY = 2 means at most 2)."""
        ceiling = max(1, concurrency)
        floor = min(max(1, min_concurrency), ceiling)
        return cls(max_limit=ceiling, min_limit=floor, initial_limit=min(max(initial, floor), ceiling))

    def __post_init__(self) -> None:
        if self.min_limit < 1 or self.max_limit < self.min_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not 0 < self.backoff_ratio < 1 or not 0 < self.rate_limited_ratio < 1:
            raise ValueError("backoff ratios must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class AppSnapshot:
    limit: int
    in_flight: int
    queued: int
    waiting_customers: int
    slow_start: bool
    granted: int
    succeeded: int
    failed: int
    quota_exhausted: int
    decreases: int
    overloads: Mapping[str, int]
    latency_p50_s: float | None
    latency_baseline_s: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "waiting_customers": self.waiting_customers,
            "slow_start": self.slow_start,
            "granted": self.granted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "quota_exhausted": self.quota_exhausted,
            "decreases": self.decreases,
            "overloads": dict(self.overloads),
            "latency_p50_s": self.latency_p50_s,
            "latency_baseline_s": self.latency_baseline_s,
        }


@dataclass(frozen=True, slots=True)
class _Turn:
    seq: int  # grant order within the app
    in_flight: int  # calls in flight toward the app right after this grant


class _App:
    def __init__(self, settings: LimiterSettings, now: float) -> None:
        s = settings
        self.settings = s
        self.limit = float(min(max(s.initial_limit, s.min_limit), s.max_limit))
        self.in_flight = 0
        self.queue: FairQueue[_Turn] = FairQueue()
        self.slow_start = True
        self.seq = 0  # grants so far; a slot's number is its grant order
        self.decrease_seq = 0  # only slots granted from here on may cause the next decrease
        self.last_overload_at = now
        self.granted = 0
        self.succeeded = 0
        self.failed = 0
        self.quota = 0
        self.decreases = 0
        self.overloads: dict[str, int] = {kind.value: 0 for kind in Overload}
        self.short: deque[float] = deque(maxlen=s.short_window)
        self.long: deque[float] = deque(maxlen=s.long_window)
        self._baseline: float | None = None  # median of `long`, refreshed every few samples
        self._samples_since_baseline = 0

    @property
    def capacity(self) -> int:
        return max(self.settings.min_limit, math.floor(self.limit))

    def limit_used(self) -> bool:
        return len(self.queue) > 0 or self.in_flight >= self.settings.used_ratio * self.limit

    def observe(self, latency: float) -> None:
        self.short.append(latency)
        self.long.append(latency)
        self._samples_since_baseline += 1
        if self._baseline is None or self._samples_since_baseline >= max(1, self.settings.short_window // 2):
            self._baseline = statistics.median(self.long)
            self._samples_since_baseline = 0

    def latency_inflated(self) -> bool:
        s = self.settings
        if (
            self._baseline is None
            or len(self.long) < s.min_long_samples
            or len(self.short) < s.short_window // 2
        ):
            return False
        return statistics.median(self.short) > s.latency_tolerance * self._baseline

    def grow(self, now: float, in_flight_at_grant: int) -> None:
        s = self.settings
        if not self.limit_used() or self.latency_inflated():
            return
        if (
            not self.slow_start
            and s.slow_start_restart_s > 0
            and now - self.last_overload_at >= s.slow_start_restart_s
        ):
            self.slow_start = True
        if self.slow_start:
            # The app took k calls at once: let it try 2k. The limit never outruns what the app proved.
            grown = max(self.limit, 2.0 * in_flight_at_grant)
        else:
            grown = self.limit + 1.0 / max(self.limit, 1.0)
        self.limit = min(float(s.max_limit), grown)

    def shrink(self, slot_seq: int, in_flight_at_grant: int, kind: Overload, now: float) -> None:
        self.overloads[kind.value] += 1
        self.last_overload_at = now
        if slot_seq < self.decrease_seq:
            return  # granted before the last decrease: part of the episode already answered
        s = self.settings
        base, ratio = self.limit, s.backoff_ratio
        if kind is Overload.RATE_LIMITED:
            # Refused at its door: the app's ceiling is below what was in flight when this one was sent.
            base = min(base, float(max(in_flight_at_grant, s.min_limit)))
            ratio = s.rate_limited_ratio
        self.limit = max(float(s.min_limit), base * ratio)
        self.slow_start = False
        self.decrease_seq = self.seq + 1
        self.decreases += 1

    def snapshot(self) -> AppSnapshot:
        return AppSnapshot(
            limit=self.capacity,
            in_flight=self.in_flight,
            queued=len(self.queue),
            waiting_customers=self.queue.customers,
            slow_start=self.slow_start,
            granted=self.granted,
            succeeded=self.succeeded,
            failed=self.failed,
            quota_exhausted=self.quota,
            decreases=self.decreases,
            overloads=dict(self.overloads),
            latency_p50_s=statistics.median(self.short) if self.short else None,
            latency_baseline_s=statistics.median(self.long) if self.long else None,
        )


class _Outcome(StrEnum):
    NONE = "none"
    SUCCESS = "success"
    OVERLOAD = "overload"
    FAILURE = "failure"
    QUOTA = "quota"


class Slot:
    """One granted Dify call. Report what happened once; leaving the block gives the slot back.

    Leaving without a report counts as success when no exception escapes; an escaping `ChatEngineError`
    is classified with `record()`; cancellation and other exceptions count as neutral failures.
    """

    def __init__(self, limiter: AdaptiveLimiter, app: _App, turn: _Turn, now: float) -> None:
        self._limiter = limiter
        self._app = app
        self.seq = turn.seq
        self.in_flight_at_grant = turn.in_flight
        self.started_at = now
        self._grew = False
        self._outcome = _Outcome.NONE
        self._released = False

    @property
    def reported(self) -> bool:
        return self._outcome is not _Outcome.NONE

    def accepted(self) -> None:
        """The app took the request (HTTP 200, the stream started): it may grow the limit at once."""
        if self._released or self._grew or self.reported:
            return
        self._grew = True
        self._app.grow(self._limiter.now(), self.in_flight_at_grant)
        self._limiter._dispatch(self._app)

    def success(self, latency_s: float | None = None) -> None:
        """Answered. `latency_s` defaults to the clock time since the slot was granted."""
        if not self._report(_Outcome.SUCCESS):
            return
        now = self._limiter.now()
        latency = max(0.0, latency_s if latency_s is not None else now - self.started_at)
        app = self._app
        app.succeeded += 1
        app.observe(latency)
        if not self._grew:
            self._grew = True
            app.grow(now, self.in_flight_at_grant)
            self._limiter._dispatch(app)

    def overload(self, kind: Overload) -> None:
        """The app refused or could not cope: the limit shrinks (once per overload episode)."""
        if not self._report(_Outcome.OVERLOAD):
            return
        self._app.failed += 1
        self._app.shrink(self.seq, self.in_flight_at_grant, kind, self._limiter.now())

    def failure(self) -> None:
        """Failed for a reason that says nothing about load (bad request, model error): no change."""
        if self._report(_Outcome.FAILURE):
            self._app.failed += 1

    def quota_exhausted(self) -> None:
        """The app's quota is used up: counted, the limit is left alone (fewer calls would not help)."""
        if self._report(_Outcome.QUOTA):
            self._app.failed += 1
            self._app.quota += 1

    def record(self, error: BaseException) -> None:
        """Report the outcome `error` stands for."""
        if isinstance(error, ChatEngineError):
            if is_quota_exhausted(error):
                self.quota_exhausted()
                return
            kind = overload_of(error)
            if kind is not None:
                self.overload(kind)
                return
        self.failure()

    def _report(self, outcome: _Outcome) -> bool:
        if self.reported or self._released:
            return False
        self._outcome = outcome
        return True

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._app.in_flight -= 1
        self._limiter._dispatch(self._app)


class _SlotContext:
    def __init__(self, limiter: AdaptiveLimiter, app_key: str, customer: Hashable, retry: bool) -> None:
        self._limiter = limiter
        self._app_key = app_key
        self._customer = customer
        self._retry = retry
        self._slot: Slot | None = None

    async def __aenter__(self) -> Slot:
        self._slot = await self._limiter.acquire(self._app_key, self._customer, first=self._retry)
        return self._slot

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        slot = self._slot
        if slot is None:
            return
        if not slot.reported:
            if exc is None:
                slot.success()
            elif isinstance(exc, ChatEngineError):
                slot.record(exc)
            else:
                slot.failure()
        slot._release()


class AdaptiveLimiter:
    """Per Dify app: at most `limit` calls in flight, the limit learnt from the app's answers.

    Usage: `async with limiter.slot(app_key, customer) as slot: ... slot.accepted() ... slot.success()`.
    Single event loop; all bookkeeping is synchronous between awaits, so no lock is needed.
    """

    def __init__(self, *, clock: Clock, settings: LimiterSettings | None = None) -> None:
        self._clock = clock
        self._settings = settings or LimiterSettings()
        self._apps: dict[str, _App] = {}

    @property
    def settings(self) -> LimiterSettings:
        return self._settings

    def now(self) -> float:
        return self._clock.now()

    def slot(self, app_key: str, customer: Hashable, *, retry: bool = False) -> _SlotContext:
        """Wait for a turn toward `app_key` on behalf of `customer` (e.g. a CustomerRef). A `retry` (the
        app refused an earlier attempt) waits at the head of the queue: it arrived before the others."""
        return _SlotContext(self, app_key, customer, retry)

    def limit(self, app_key: str) -> int:
        return self._app(app_key).capacity

    def has_room(self) -> bool:
        """True while a new call to any app this instance asks would be granted at once (nobody queued, a slot
        free): an instance that shares a burst with others takes more customers only then
        (application/work_sharing.py)."""
        return all(not app.queue and app.in_flight < app.capacity for app in self._apps.values())

    def room(self) -> int:
        """How many customers this instance should take on at once now (work sharing,
        application/work_sharing.py): the largest current limit of the apps it asks (the initial limit before
        it asked any), and SLOW_START_ROOM times that while in slow start.

        In slow start the limit doubles per round trip only while it is used (someone waits or nearly all
        slots are busy). A customer taken on spends time before its Dify call (claim, session state) and
        each look at the shared inbox comes a scan interval apart: taking on the next two doublings' worth
        keeps customers waiting for slots, so the limit grows as fast as a single instance's, while the
        other instances take their share of the burst. Once an overload was seen, the limit itself."""
        s = self._settings
        if not self._apps:
            return SLOW_START_ROOM * min(max(s.initial_limit, s.min_limit), s.max_limit)
        return max(app.capacity * (SLOW_START_ROOM if app.slow_start else 1) for app in self._apps.values())

    def snapshot(self) -> dict[str, AppSnapshot]:
        return {key: app.snapshot() for key, app in self._apps.items()}

    def status(self) -> dict[str, dict[str, object]]:
        """`snapshot()` as plain data, for /status and /metrics."""
        return {key: state.as_dict() for key, state in self.snapshot().items()}

    def status_section(self) -> dict[str, object]:
        """The /status section: `{"dify_apps": {app_key: {limit, in_flight, queued, ...}}}`."""
        return {"dify_apps": self.status()}

    async def acquire(self, app_key: str, customer: Hashable, *, first: bool = False) -> Slot:
        """A granted slot; give it back with `release()` (prefer `slot()`, which does that itself).

        Cancelled while waiting (task cancelled, deadline passed): the place in the queue is dropped, and a
        turn granted in the same instant goes back to the next waiter.
        """
        app = self._app(app_key)
        if len(app.queue) == 0 and app.in_flight < app.capacity:
            return Slot(self, app, self._grant(app), self._clock.now())
        waiter: asyncio.Future[_Turn] = asyncio.get_running_loop().create_future()
        app.queue.push(customer, waiter, first=first)
        self._dispatch(app)  # normally a no-op: whoever made room has handed it out already
        try:
            turn = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted, then cancelled before it could run: the turn goes to the next waiter.
                app.in_flight -= 1
                self._dispatch(app)
            else:
                app.queue.remove(customer, waiter)
                self._dispatch(app)
            raise
        return Slot(self, app, turn, self._clock.now())

    def release(self, slot: Slot) -> None:
        if not slot.reported:
            slot.failure()
        slot._release()

    def _dispatch(self, app: _App) -> None:
        """Hand turns to waiters while the app has room."""
        while app.in_flight < app.capacity:
            waiter = app.queue.pop()
            if waiter is None:
                return
            waiter.set_result(self._grant(app))

    @staticmethod
    def _grant(app: _App) -> _Turn:
        app.in_flight += 1
        app.seq += 1
        app.granted += 1
        return _Turn(app.seq, app.in_flight)

    def _app(self, key: str) -> _App:
        app = self._apps.get(key)
        if app is None:
            app = self._apps[key] = _App(self._settings, self._clock.now())
        return app
