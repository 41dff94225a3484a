"""What the operator console shows over time, kept per instance in bounded memory.

A telemetry listener (application/telemetry.py): every counted event and Dify latency lands in per-minute
buckets for the last hour and in today's totals; the customer a counted event concerns (the message being
handled, application/log_context.py) becomes one of the recently active customers; failures become entries
of the recent problems list, each with the hint `check` gives for it (application/hints.py).

Nothing here is shared between instances: a console shows the instance it is served by, and says so.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from application.hints import dify_hint_for, wecom_hint_for
from application.log_context import handled_message
from application.telemetry import DIFY
from domain.delivery import describe_fail_type, means_customer_rejects

WINDOW_MINUTES: Final = 60
MAX_CUSTOMERS: Final = 500
MAX_PROBLEMS: Final = 200
MAX_OUTCOMES: Final = 10
MAX_LATENCY_SAMPLES_PER_MINUTE: Final = 512

# The counters the console shows, by their name in /status (plain counters there, or labelled ones whose
# labels are summed here).
WINDOW_COUNTERS: Final = (
    "answered",
    "fallbacks",
    "handoffs",
    "rate_limited",
    "send_failures",
    "media_received",
)

# Problem kinds.
DIFY_ERROR: Final = "dify_error"
WECOM_ERRCODE: Final = "wecom_errcode"
SEND_FAILURE: Final = "send_failure"
HANDOFF_REFUSED: Final = "handoff_refused"
MEDIA_FAILURE: Final = "media_failure"
STORE_DEGRADED: Final = "store_degraded"

_MEDIA_HINT: Final = (
    "the customer got the 'unsupported' text; check [BOT] media limits, ffmpeg for voice (run check) "
    "and that the Dify app accepts files"
)
_SEND_HINT: Final = "WeCom could not deliver a reply: see the fail type; nothing to change unless it repeats"
_REJECT_HINT: Final = "the customer turned off messages: no proactive texts until they write again"
_STORE_HINT: Final = (
    "memcached is unreachable: answers go on from this instance's memory; check the memcached servers "
    "in [MEMCACHE] (run check)"
)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Problem:
    at: float
    kind: str
    code: str
    open_kfid: str
    customer: str
    summary: str
    hint: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind,
            "code": self.code,
            "open_kfid": self.open_kfid,
            "customer": self.customer,
            "summary": self.summary,
            "hint": self.hint,
        }


@dataclass(slots=True)
class CustomerActivity:
    open_kfid: str
    customer: str
    first_seen: float
    last_message_at: float
    messages: int = 0
    nickname: str = ""
    last_outcome: str = ""
    outcomes: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=MAX_OUTCOMES))
    entered_at: float | None = None
    entry_events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "open_kfid": self.open_kfid,
            "customer": self.customer,
            "nickname": self.nickname,
            "first_seen": self.first_seen,
            "last_message_at": self.last_message_at,
            "messages": self.messages,
            "last_outcome": self.last_outcome,
            "outcomes": [{"at": at, "outcome": outcome} for at, outcome in reversed(self.outcomes)],
            "entered_at": self.entered_at,
        }


@dataclass(slots=True)
class _Minute:
    minute: int  # Unix minute (seconds // 60)
    counts: dict[str, int] = field(default_factory=dict)
    dify_latency: list[float] = field(default_factory=list)


class Insights:
    """Thread-unsafe by design, like Telemetry: everything runs on the pipeline's event loop."""

    def __init__(
        self,
        *,
        instance: str,
        clock: Clock = time.time,
        max_customers: int = MAX_CUSTOMERS,
        max_problems: int = MAX_PROBLEMS,
    ) -> None:
        self.instance = instance
        self._clock = clock
        self._max_customers = max_customers
        self._minutes: deque[_Minute] = deque(maxlen=WINDOW_MINUTES)
        self._day = self._day_of(clock())
        self._today: dict[str, int] = {}
        self._customers: OrderedDict[tuple[str, str], CustomerActivity] = OrderedDict()
        self._problems: deque[Problem] = deque(maxlen=max_problems)
        self._store_degraded = False

    # --- TelemetryListener ----------------------------------------------------------------------------

    def on_count(self, name: str, n: int, label: str | None) -> None:
        now = self._clock()
        if name in WINDOW_COUNTERS:
            self._bump(name, n, now)
        if name == "outcomes" and label:
            self._outcome(label, now)
        elif name == "events" and label == "enter_session":
            self._entered(now)
        elif label is not None:
            self._maybe_problem(name, label, now)

    def on_observe(self, name: str, seconds: float) -> None:
        if name != DIFY:
            return
        samples = self._minute(self._clock()).dify_latency
        if len(samples) < MAX_LATENCY_SAMPLES_PER_MINUTE:
            samples.append(seconds)

    # --- other feeds ----------------------------------------------------------------------------------

    def store_seen(self, *, degraded: bool, backend: str) -> None:
        """The store's state as /status or the console saw it: a turn to degraded is a problem."""
        if degraded and not self._store_degraded:
            self._problem(
                STORE_DEGRADED,
                backend,
                "",
                "",
                f"the {backend} store is degraded",
                _STORE_HINT,
                self._clock(),
            )
        self._store_degraded = degraded

    def learn_nickname(self, open_kfid: str, customer: str, nickname: str) -> None:
        activity = self._customers.get((open_kfid, customer))
        if activity is not None and nickname:
            activity.nickname = nickname[:64]

    # --- reads ----------------------------------------------------------------------------------------

    def windows(self) -> dict[str, dict[str, int]]:
        """Today's and the last hour's counters, by their /status names."""
        now = self._clock()
        self._roll_day(now)
        recent = self._recent_minutes(now)
        last_hour = {name: sum(m.counts.get(name, 0) for m in recent) for name in WINDOW_COUNTERS}
        today = {name: self._today.get(name, 0) for name in WINDOW_COUNTERS}
        return {"today": today, "last_hour": last_hour}

    def per_minute(self) -> list[dict[str, Any]]:
        """The last hour, one entry per minute (oldest first, empty minutes included): the answered count
        and Dify's p50/p95 answer latency in seconds (None when Dify was not asked that minute)."""
        now = self._clock()
        current = int(now // 60)
        by_minute = {m.minute: m for m in self._recent_minutes(now)}
        series = []
        for minute in range(current - WINDOW_MINUTES + 1, current + 1):
            bucket = by_minute.get(minute)
            samples = sorted(bucket.dify_latency) if bucket else []
            series.append(
                {
                    "minute": minute * 60,
                    "answered": bucket.counts.get("answered", 0) if bucket else 0,
                    "dify_p50": _percentile(samples, 0.5),
                    "dify_p95": _percentile(samples, 0.95),
                }
            )
        return series

    def customers(self, query: str = "", limit: int = 50) -> list[CustomerActivity]:
        """The most recently active customers, newest first; `query` narrows to customer ids (or nicknames)
        containing it."""
        needle = query.strip().lower()
        found: list[CustomerActivity] = []
        for activity in reversed(self._customers.values()):
            if needle and needle not in activity.customer.lower() and needle not in activity.nickname.lower():
                continue
            found.append(activity)
            if len(found) >= limit:
                break
        return found

    def customer(self, open_kfid: str, customer: str) -> CustomerActivity | None:
        return self._customers.get((open_kfid, customer))

    def status_section(self) -> dict[str, Any]:
        """What /status adds for the console: which instance, and today's and the last hour's counters."""
        return {"instance": self.instance, "windows": self.windows()}

    def problems(self) -> list[Problem]:
        """The recent problems, newest first."""
        return list(reversed(self._problems))

    # --- internals ------------------------------------------------------------------------------------

    def _bump(self, name: str, n: int, now: float) -> None:
        bucket = self._minute(now)
        bucket.counts[name] = bucket.counts.get(name, 0) + n
        self._roll_day(now)
        self._today[name] = self._today.get(name, 0) + n

    def _minute(self, now: float) -> _Minute:
        minute = int(now // 60)
        if self._minutes and self._minutes[-1].minute == minute:
            return self._minutes[-1]
        if self._minutes and self._minutes[-1].minute > minute:  # the wall clock stepped back
            return self._minutes[-1]
        bucket = _Minute(minute)
        self._minutes.append(bucket)
        return bucket

    def _recent_minutes(self, now: float) -> list[_Minute]:
        first = int(now // 60) - WINDOW_MINUTES + 1
        return [m for m in self._minutes if m.minute >= first]

    @staticmethod
    def _day_of(now: float) -> tuple[int, int, int]:
        local = time.localtime(now)
        return (local.tm_year, local.tm_mon, local.tm_mday)

    def _roll_day(self, now: float) -> None:
        day = self._day_of(now)
        if day != self._day:
            self._day = day
            self._today = {}

    def _current_customer(self, now: float) -> CustomerActivity | None:
        context = handled_message.get()
        if context is None or not context.customer:
            return None
        key = (context.kf, context.customer)
        activity = self._customers.get(key)
        if activity is None:
            activity = CustomerActivity(context.kf, context.customer, first_seen=now, last_message_at=now)
            self._customers[key] = activity
            while len(self._customers) > self._max_customers:
                self._customers.popitem(last=False)
        else:
            self._customers.move_to_end(key)
        return activity

    def _outcome(self, outcome: str, now: float) -> None:
        activity = self._current_customer(now)
        if activity is None:
            return
        activity.messages += 1
        activity.last_message_at = now
        activity.last_outcome = outcome
        activity.outcomes.append((now, outcome))

    def _entered(self, now: float) -> None:
        activity = self._current_customer(now)
        if activity is not None:
            activity.entered_at = now
            activity.entry_events += 1

    def _maybe_problem(self, name: str, label: str, now: float) -> None:
        context = handled_message.get()
        kf, customer = (context.kf, context.customer) if context is not None else ("", "")
        if name == "dify_errors":
            summary = f"Dify failed: {label}"
            self._problem(DIFY_ERROR, label, kf, customer, summary, dify_hint_for(label), now)
        elif name == "wecom_errors":
            errcode = _int_or_none(label)
            summary = "WeCom unreachable" if errcode is None else f"WeCom answered errcode {label}"
            self._problem(WECOM_ERRCODE, label, kf, customer, summary, wecom_hint_for(errcode), now)
        elif name == "handoff_failures":
            errcode = _int_or_none(label)
            summary = f"handoff to a human refused (errcode {label})"
            self._problem(HANDOFF_REFUSED, label, kf, customer, summary, wecom_hint_for(errcode), now)
        elif name == "send_failures":
            fail_type = _int_or_none(label)
            summary = f"WeCom could not deliver a reply: fail_type {label} ({describe_fail_type(fail_type)})"
            hint = _REJECT_HINT if means_customer_rejects(fail_type) else _SEND_HINT
            self._problem(SEND_FAILURE, label, kf, customer, summary, hint, now)
        elif name == "media_declined":
            self._problem(MEDIA_FAILURE, label, kf, customer, f"media not handled: {label}", _MEDIA_HINT, now)

    def _problem(
        self, kind: str, code: str, kf: str, customer: str, summary: str, hint: str, now: float
    ) -> None:
        self._problems.append(Problem(now, kind, code, kf, customer, summary, hint))


def _int_or_none(label: str) -> int | None:
    try:
        return int(label)
    except ValueError:
        return None


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    return round(samples[min(len(samples) - 1, int(q * len(samples)))], 4)
