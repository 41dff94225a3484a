"""After Dify refused or failed an answer: what the failure says about the app's load, and whether and
when to ask again.

`overload_of` turns a `ChatEngineError` into an overload signal for the concurrency limiter
(application/concurrency.py). `RetryPolicy` decides how long to wait before asking again (exponential
backoff with jitter, honouring Retry-After, within the answer's deadline) or to give up; an exhausted quota
is told apart from momentary overload (docs/dify.md §4.2): reported once per episode, never retried, and an
app that Dify itself refuses for its quota (429) is not asked again for a while.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum

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


def is_refusal(error: ChatEngineError) -> bool:
    """Dify refused the request for now (429 that is no exhausted quota, 503): worth asking again later."""
    if is_quota_exhausted(error):
        return False
    return overload_of(error) is Overload.RATE_LIMITED or error.status == 503 or error.code == "http_503"


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
    # Attempts in total after refusals (429 too_many_requests, 503): the app said "not now", so asking again
    # later is the point; 0 = the same bound as other failures (`max_attempts`).
    overload_max_attempts: int = 0


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
        self._quota_until: dict[str, float] = {}  # app → not asked until then
        self._quota_reported_until: dict[str, float] = {}  # app → its quota episode was logged; not again

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
            cooldown = max(s.quota_cooldown_s, wait or 0.0)
            reported = self._quota_reported_until.get(app_key)
            first = reported is None or now >= reported
            if first:
                self._quota_reported_until[app_key] = now + cooldown
            # A 429 is Dify refusing the app itself (its daily limit, the plan's quota): asking again during
            # the cooldown cannot succeed. A model provider's quota (400) can end the moment the operator
            # changes the provider's credentials in Dify: the next question is still asked (once, no retry).
            if (error.status == 429 or error.code.lower() == "rate_limit_error") and not self.quota_blocked(
                app_key
            ):
                self._quota_until[app_key] = now + cooldown
            return RetryDecision(False, reason="quota exhausted", quota_exhausted=True, report_quota=first)
        kind = overload_of(error)
        if kind is Overload.TIMEOUT or error.code == "idle_timeout":
            # A timed-out answer already cost the customer the whole wait: do not make them wait twice.
            return RetryDecision(False, reason="timed out")
        if not error.retryable and kind is None:
            return RetryDecision(False, reason="not retryable")
        limit = (
            s.overload_max_attempts if s.overload_max_attempts > 0 and is_refusal(error) else s.max_attempts
        )
        if attempt >= limit:
            return RetryDecision(False, reason="attempts used up")
        room = deadline - now - s.min_attempt_s
        if room <= 0:
            return RetryDecision(False, reason="no time left before the deadline")
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
