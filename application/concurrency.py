"""How many Dify calls run at once toward each Dify app, and when to ask again after a rejection.

A fixed number is wrong both ways: too low for a Dify deployment that could take more (customers wait in
our queue while Dify idles), too high for one that cannot (Dify answers 429 and customers get the fallback
text). `AdaptiveLimiter` learns each app's capacity from what the app answers:

- It grows while answers come back and the limit is actually used: slow start first (an accepted request
  that was sent with k calls in flight lets the limit reach 2k, so it doubles every round trip, like
  TCP's slow start), then +1 per round trip (+1/limit per answer) once an overload was seen. A Dify
  answer takes seconds, but Dify accepts or refuses a request at once (its per-app concurrency check
  runs before the stream starts, docs/dify.md), so callers that report `Slot.accepted()` when the
  answer starts let a burst reach a thousand calls within about a second; without it the limit
  doubles once per answer time.
- It shrinks on explicit overload signals (429, 502/503, connection refused, timeouts): ×0.7, once per
  overload episode. Only a request granted after the last decrease can cause the next one, so the 50
  rejections of one overshoot count as one decrease.
- Latency only stops growth: when the recent median answer time exceeds twice the long-run median. LLM
  latency mostly depends on the question, not on load, so it is a weak overload signal.

Waiting callers are served fairly: round robin across customers, in the order each customer's turn came
up, each customer's own requests in their order. A customer with fifty waiting messages delays nobody.

`RetryPolicy` decides, after a rejection, how long to wait before asking again (exponential backoff with
jitter, honouring Retry-After, within the answer's deadline) or to give up; an exhausted quota is told
apart from momentary overload and is not asked again for a while.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from types import TracebackType
from urllib.parse import urlsplit

from application.errors import ChatEngineError
from application.ports import Clock

# --- Outcome classification -------------------------------------------------------------------------


class Overload(StrEnum):
    """An explicit sign that the app took more than it can: the limit shrinks."""

    RATE_LIMITED = "rate_limited"  # 429 too_many_requests (the app's concurrency cap), provider rate limit
    UNAVAILABLE = "unavailable"  # 502/503: Dify or its gateway cannot take the request now
    REFUSED = "refused"  # connection refused / unreachable (transient)
    TIMEOUT = "timeout"  # the request timed out, or the gateway did (504)


# Error codes that mean a quota is used up: retrying soon cannot help (docs/dify.md, error codes).
QUOTA_CODES = frozenset({"provider_quota_exceeded", "quota_exceeded", "app_quota_exceeded"})
# Words of quota messages ("Your quota ... has been exhausted", "You exceeded your current quota, please check
# your plan and billing details", daily limits). Not "exhausted" alone: providers say "resource exhausted"
# for momentary rate limits too.
_QUOTA_WORDS = ("quota", "daily", "per day", "billing", "plan limit", "额度", "配额")
# A `rate_limit_error` is Dify Cloud's plan quota unless its text names a short-term provider rate.
_SHORT_TERM_WORDS = ("per min", "per second", "rpm", "tpm", "requests per", "tokens per", "try again in")
_RATE_LIMIT_WORDS = (
    "rate limit",
    "ratelimit",
    "too many requests",
    "overloaded",
    "resource has been exhausted",
    "resource_exhausted",
)


def is_quota_exhausted(error: ChatEngineError) -> bool:
    """True when the app (or its model provider) used up a quota: an operator must act or wait for a reset."""
    code = error.code.lower()
    text = error.message.lower()
    if code in QUOTA_CODES:
        return True
    if code == "rate_limit_error":
        return not any(word in text for word in _SHORT_TERM_WORDS)
    return any(word in text for word in _QUOTA_WORDS)


def overload_of(error: ChatEngineError) -> Overload | None:
    """The overload signal `error` carries, or None when it says nothing about the app's load."""
    if is_quota_exhausted(error):
        return None
    code = error.code.lower()
    status = error.status
    if status == 429 or code in ("too_many_requests", "rate_limit_error", "http_429"):
        return Overload.RATE_LIMITED
    if code == "completion_request_error" and any(w in error.message.lower() for w in _RATE_LIMIT_WORDS):
        return Overload.RATE_LIMITED  # the model provider's rate limit, reported by Dify as a model error
    if status in (502, 503) or code in ("http_502", "http_503"):
        return Overload.UNAVAILABLE
    if status == 504 or code in ("timeout", "http_504"):
        return Overload.TIMEOUT
    if code == "unreachable" and error.retryable:
        return Overload.REFUSED
    return None


def dify_app_key(base_url: str, api_key: str) -> str:
    """A name for one Dify app that is safe to show (/status, logs): host plus a fingerprint of the key."""
    host = urlsplit(base_url).netloc or base_url
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\n{api_key}".encode()).hexdigest()[:10]
    return f"{host}#{digest}"


# --- Adaptive limiter -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    # Bounds of the number of Dify calls in flight per app ([BOT] DIFY_CONCURRENCY, DIFY_MIN_CONCURRENCY).
    max_limit: int = 1000
    min_limit: int = 4
    initial_limit: int = 16
    # Multiplicative decrease on an overload episode.
    backoff_ratio: float = 0.7
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
    def from_config(cls, *, concurrency: int, min_concurrency: int, initial: int = 16) -> LimiterSettings:
        """From `[BOT] DIFY_CONCURRENCY` (ceiling) and `DIFY_MIN_CONCURRENCY` (floor): a ceiling set below
        the floor wins (an operator who writes DIFY_CONCURRENCY = 2 means at most 2)."""
        ceiling = max(1, concurrency)
        floor = min(max(1, min_concurrency), ceiling)
        return cls(max_limit=ceiling, min_limit=floor, initial_limit=min(max(initial, floor), ceiling))

    def __post_init__(self) -> None:
        if self.min_limit < 1 or self.max_limit < self.min_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        if not 0 < self.backoff_ratio < 1:
            raise ValueError("backoff_ratio must be between 0 and 1")


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


class _FairQueue:
    """Waiters per customer; customers take turns in the order their turn came up."""

    def __init__(self) -> None:
        self._by_customer: dict[Hashable, deque[asyncio.Future[_Turn]]] = {}  # insertion order = turn order
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def customers(self) -> int:
        return len(self._by_customer)

    def push(self, customer: Hashable, waiter: asyncio.Future[_Turn]) -> None:
        self._by_customer.setdefault(customer, deque()).append(waiter)
        self.size += 1

    def pop(self) -> asyncio.Future[_Turn] | None:
        """The next live waiter (its customer goes to the back of the round), or None."""
        while self._by_customer:
            customer = next(iter(self._by_customer))
            waiters = self._by_customer[customer]
            waiter = waiters.popleft()
            self.size -= 1
            if waiter.done():  # cancelled, its task not yet run: the customer keeps their place
                if not waiters:
                    del self._by_customer[customer]
                continue
            del self._by_customer[customer]
            if waiters:
                self._by_customer[customer] = waiters  # re-inserted: last in turn order
            return waiter
        return None

    def remove(self, customer: Hashable, waiter: asyncio.Future[_Turn]) -> bool:
        waiters = self._by_customer.get(customer)
        if waiters is None or waiter not in waiters:
            return False
        waiters.remove(waiter)
        self.size -= 1
        if not waiters:
            del self._by_customer[customer]
        return True


class _App:
    def __init__(self, settings: LimiterSettings, now: float) -> None:
        s = settings
        self.settings = s
        self.limit = float(min(max(s.initial_limit, s.min_limit), s.max_limit))
        self.in_flight = 0
        self.queue = _FairQueue()
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
        base = self.limit
        if kind is Overload.RATE_LIMITED:
            # Refused at its door: the app's ceiling is below what was in flight when this one was sent.
            base = min(base, float(max(in_flight_at_grant, s.min_limit)))
        self.limit = max(float(s.min_limit), base * s.backoff_ratio)
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
    def __init__(self, limiter: AdaptiveLimiter, app_key: str, customer: Hashable) -> None:
        self._limiter = limiter
        self._app_key = app_key
        self._customer = customer
        self._slot: Slot | None = None

    async def __aenter__(self) -> Slot:
        self._slot = await self._limiter.acquire(self._app_key, self._customer)
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

    def slot(self, app_key: str, customer: Hashable) -> _SlotContext:
        """Wait for a turn toward `app_key` on behalf of `customer` (e.g. a CustomerRef)."""
        return _SlotContext(self, app_key, customer)

    def limit(self, app_key: str) -> int:
        return self._app(app_key).capacity

    def snapshot(self) -> dict[str, AppSnapshot]:
        return {key: app.snapshot() for key, app in self._apps.items()}

    def status(self) -> dict[str, dict[str, object]]:
        """`snapshot()` as plain data, for /status and /metrics."""
        return {key: state.as_dict() for key, state in self.snapshot().items()}

    async def acquire(self, app_key: str, customer: Hashable) -> Slot:
        """A granted slot; give it back with `release()` (prefer `slot()`, which does that itself).

        Cancelled while waiting (task cancelled, deadline passed): the place in the queue is dropped, and a
        turn granted in the same instant goes back to the next waiter.
        """
        app = self._app(app_key)
        if len(app.queue) == 0 and app.in_flight < app.capacity:
            return Slot(self, app, self._grant(app), self._clock.now())
        waiter: asyncio.Future[_Turn] = asyncio.get_running_loop().create_future()
        app.queue.push(customer, waiter)
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


# --- Retry policy -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0
    reason: str = ""
    # The app's quota is used up: the caller sends the fallback text and does not ask again for a while.
    quota_exhausted: bool = False
    # True for the first quota report of an episode only: the caller logs (alerts) exactly then.
    report_quota: bool = False


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 3  # asks in total, the first included
    base_delay_s: float = 1.0
    max_delay_s: float = 20.0
    # An attempt needs at least this long; a retry that cannot finish before the deadline is not made.
    min_attempt_s: float = 2.0
    # How long an app with an exhausted quota is not asked again (unless Retry-After says otherwise).
    quota_cooldown_s: float = 300.0
    # Retry-After beyond this is not waited for within one answer.
    max_retry_after_s: float = 60.0


def parse_retry_after(value: str | float | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date. None when absent or bad."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return max(0.0, float(value)) if math.isfinite(value) else None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None  # RFC 9110 dates are GMT; a date without a zone is not one
        return max(0.0, when.timestamp() - now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


class RetryPolicy:
    """Whether and when to ask Dify again after a failed attempt (pure decisions, no waiting)."""

    def __init__(
        self,
        *,
        clock: Clock,
        settings: RetrySettings | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._settings = settings or RetrySettings()
        self._rng = rng
        self._quota_until: dict[str, float] = {}

    @property
    def settings(self) -> RetrySettings:
        return self._settings

    def quota_blocked(self, app_key: str) -> bool:
        """True while `app_key`'s quota is known to be used up: answer with the fallback, do not ask."""
        until = self._quota_until.get(app_key)
        if until is None:
            return False
        if self._clock.now() >= until:
            del self._quota_until[app_key]
            return False
        return True

    def decide(
        self,
        error: ChatEngineError,
        *,
        attempt: int,
        deadline: float,
        retry_after: str | float | None = None,
        app_key: str = "",
    ) -> RetryDecision:
        """After failed attempt number `attempt` (1 = the first ask), with the answer due at `deadline`
        (clock seconds): wait `delay_s` and ask again, or give up."""
        s = self._settings
        now = self._clock.now()
        wait = parse_retry_after(retry_after, now=now)
        if is_quota_exhausted(error):
            first = not self.quota_blocked(app_key)
            if first:
                cooldown = max(s.quota_cooldown_s, wait or 0.0)
                self._quota_until[app_key] = now + cooldown
            return RetryDecision(False, reason="quota exhausted", quota_exhausted=True, report_quota=first)
        kind = overload_of(error)
        if kind is Overload.TIMEOUT or error.code == "idle_timeout":
            # A timed-out answer already cost the customer the whole wait: do not make them wait twice.
            return RetryDecision(False, reason="timed out")
        if not error.retryable and kind is None:
            return RetryDecision(False, reason="not retryable")
        if attempt >= s.max_attempts:
            return RetryDecision(False, reason="attempts used up")
        room = deadline - now - s.min_attempt_s
        if wait is not None:
            if wait > s.max_retry_after_s or wait > room:
                return RetryDecision(False, reason=f"Retry-After {wait:g} s does not fit")
            # Honour the server's wait, plus a little jitter so a burst does not come back at once.
            delay = min(wait + wait * 0.1 * self._rng(), room)
            return RetryDecision(True, delay, reason="Retry-After")
        ceiling = min(s.max_delay_s, s.base_delay_s * 2 ** max(attempt - 1, 0))
        delay = ceiling / 2 + ceiling / 2 * self._rng()  # "equal jitter": spread out, never immediate
        delay = min(delay, room)
        if delay < 0:
            return RetryDecision(False, reason="no time left before the deadline")
        return RetryDecision(True, delay, reason=kind.value if kind is not None else error.code)


__all__ = [
    "QUOTA_CODES",
    "AdaptiveLimiter",
    "AppSnapshot",
    "LimiterSettings",
    "Overload",
    "RetryDecision",
    "RetryPolicy",
    "RetrySettings",
    "Slot",
    "dify_app_key",
    "is_quota_exhausted",
    "overload_of",
    "parse_retry_after",
]
