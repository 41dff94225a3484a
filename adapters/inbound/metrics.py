"""Prometheus exposition of the in-process telemetry: `GET /metrics`.

Every `Telemetry.count`/`count_labelled`/`observe` is mirrored as it happens (this class is a
`TelemetryListener`); counters that existed before the exporter was attached are seeded from the telemetry.

Naming: `count("x")` → counter `kfdify_x_total`; `count_labelled("x", v)` → `kfdify_x_total{<label>="v"}`
(label name from `LABEL_NAMES`, else "label"); `observe("x", s)` → histogram `kfdify_x_seconds`.
Each instance has its own registry (never prometheus_client's global one): tests build many apps in one
process, and two registrations of one name in a registry are an error.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from application.telemetry import CALLBACK_ACK, DIFY, PULL, SEND, Telemetry

log = logging.getLogger("kfdify.metrics")
_M = TypeVar("_M", Counter, Histogram)

PREFIX: Final = "kfdify"

LABEL_NAMES: Final[Mapping[str, str]] = {
    "dify_errors": "code",
    "wecom_errors": "errcode",
    "events": "event_type",
    "callback_events": "event",
    "callbacks_rejected": "status",
    "outcomes": "outcome",
    "handoffs": "trigger",
    "handoff_failures": "errcode",
    "media_received": "kind",
    "media_declined": "reason",
    "rate_limited": "decision",
    "send_failures": "fail_type",
    "welcomes_skipped": "reason",
    "described_messages": "msgtype",
    "dify_overloads": "kind",
    "dify_retries": "reason",
}
DEFAULT_LABEL: Final = "label"

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Listed on /metrics from the start, so dashboards and alerts see zeros instead of "no data".
PRECREATED_HISTOGRAMS: Final = (CALLBACK_ACK, PULL, DIFY, SEND)
PRECREATED_COUNTERS: Final = (
    "callbacks",
    "messages_pulled",
    "answered",
    "deduplicated",
    "ignored_too_old",
    "replies_sent",
    "fallbacks",
)

# Label values come from outside (Dify codes, WeCom errcodes, event types): past this many distinct values
# per counter, new ones are counted under "other" so a misbehaving peer cannot grow the exposition forever.
MAX_LABEL_VALUES: Final = 200
OTHER_LABEL_VALUE: Final = "other"

_HELP: Final[Mapping[str, str]] = {
    "cursors_dropped": "Stored kf/sync_msg cursors dropped after WeCom kept refusing them",
    "callbacks": "WeCom callbacks received",
    "messages_pulled": "Items read from kf/sync_msg",
    "answered": "Customer messages answered by Dify",
    "deduplicated": "Customer messages skipped because they were already handled",
    "ignored_too_old": "Customer messages too old to answer",
    "replies_sent": "Text messages sent to customers",
    "fallbacks": "Fallback texts sent because Dify could not answer",
    "dify_errors": "Dify failures by error code",
    "wecom_errors": "WeCom API failures by errcode",
    "events": "kf events by event type",
    "callback_events": "Callback notices by event",
    "callbacks_rejected": "Callbacks refused, by HTTP status",
    "outcomes": "Handled customer messages by outcome",
    "merged_messages": "Customer texts asked together with an earlier one (MERGE_WINDOW)",
    CALLBACK_ACK: "Time to acknowledge a WeCom callback",
    PULL: "Duration of one kf/sync_msg pull",
    DIFY: "Duration of one Dify answer",
    SEND: "Duration of one kf/send_msg call",
}

_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9_]")

# The adaptive limiter's per-app state (`AdaptiveLimiter.status()`): app key → limit, in_flight, queued, ...
DifyAppsSource = Callable[[], Mapping[str, Mapping[str, object]]]


def metric_name(name: str) -> str:
    """`kfdify_<name>` with everything outside [a-zA-Z0-9_] replaced by "_"."""
    return f"{PREFIX}_{_UNSAFE.sub('_', name)}"


class PrometheusMetrics:
    """Mirrors a `Telemetry` into its own Prometheus registry and serves it."""

    def __init__(self, telemetry: Telemetry, dify_apps: DifyAppsSource | None = None) -> None:
        self.registry = CollectorRegistry()
        self._telemetry = telemetry
        self._counters: dict[str, Counter] = {}
        self._labelled: dict[str, Counter] = {}
        self._label_values: dict[str, set[str]] = {}
        self._histograms: dict[str, Histogram] = {}
        self._broken: set[str] = set()  # "kind:name" keys that failed (logged once, then skipped)

        for name in PRECREATED_HISTOGRAMS:
            self._histogram(name)
        for name in PRECREATED_COUNTERS:
            self._counter(name)
        Gauge(
            metric_name("in_flight_messages"),
            "Customer messages being answered right now",
            registry=self.registry,
        ).set_function(lambda: float(telemetry.in_flight))
        Gauge(
            metric_name("uptime_seconds"),
            "Seconds since the service started",
            registry=self.registry,
        ).set_function(lambda: max(0.0, time.time() - telemetry.started_at))

        if dify_apps is not None:
            self.registry.register(DifyAppsCollector(dify_apps))

        self._seed(telemetry)
        telemetry.listeners.append(self)

    # --- TelemetryListener ----------------------------------------------------------------------------
    # Called synchronously from the use cases: must never raise into them.

    def on_count(self, name: str, n: int, label: str | None) -> None:
        try:
            self._inc(name, n, label)
        except Exception:  # a metrics problem must not break answering customers
            self._note_broken(f"{'labelled' if label is not None else 'counter'}:{name}", "count")

    def on_observe(self, name: str, seconds: float) -> None:
        try:
            histogram = self._histogram(name)
            if histogram is not None:
                histogram.observe(max(0.0, seconds))
        except Exception:
            self._note_broken(f"histogram:{name}", "observe")

    # --- the endpoint ---------------------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        """`GET /metrics`: Prometheus text format, or OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.registry), headers={"Content-Type": content_type})

    # --- internals ------------------------------------------------------------------------------------

    def _seed(self, telemetry: Telemetry) -> None:
        for name, n in list(telemetry.counters.items()):
            if n > 0:
                self._inc(name, n, None)
        for name, values in list(telemetry.labelled.items()):
            for label, n in list(values.items()):
                if n > 0:
                    self._inc(name, n, label)
        # Latencies: only the samples Telemetry still holds (all of them unless it ran long unattached).
        for name, series in list(telemetry.series.items()):
            histogram = self._histogram(name)
            if histogram is not None:
                for seconds in list(series.samples):
                    histogram.observe(max(0.0, seconds))

    def _inc(self, name: str, n: int, label: str | None) -> None:
        if n <= 0:
            return  # Prometheus counters only go up
        if label is None:
            counter = self._counter(name)
            if counter is not None:
                counter.inc(n)
            return
        labelled = self._labelled_counter(name)
        if labelled is None:
            return
        seen = self._label_values.setdefault(name, set())
        if label not in seen:
            if len(seen) >= MAX_LABEL_VALUES:
                label = OTHER_LABEL_VALUE
            seen.add(label)
        labelled.labels(label).inc(n)

    def _counter(self, name: str) -> Counter | None:
        key = f"counter:{name}"
        if name not in self._counters and key not in self._broken:
            made = self._register(key, lambda: Counter(*self._describe(name), registry=self.registry))
            if made is not None:
                self._counters[name] = made
        return self._counters.get(name)

    def _labelled_counter(self, name: str) -> Counter | None:
        key = f"labelled:{name}"
        if name not in self._labelled and key not in self._broken:
            label_name = LABEL_NAMES.get(name, DEFAULT_LABEL)
            made = self._register(
                key, lambda: Counter(*self._describe(name), [label_name], registry=self.registry)
            )
            if made is not None:
                self._labelled[name] = made
        return self._labelled.get(name)

    def _histogram(self, name: str) -> Histogram | None:
        key = f"histogram:{name}"
        if name not in self._histograms and key not in self._broken:
            made = self._register(
                key,
                lambda: Histogram(
                    f"{metric_name(name)}_seconds",
                    _HELP.get(name, f"Latency series {name!r}"),
                    buckets=LATENCY_BUCKETS,
                    registry=self.registry,
                ),
            )
            if made is not None:
                self._histograms[name] = made
        return self._histograms.get(name)

    def _describe(self, name: str) -> tuple[str, str]:
        return f"{metric_name(name)}_total", _HELP.get(name, f"Telemetry counter {name!r}")

    def _register(self, key: str, make: Callable[[], _M]) -> _M | None:
        try:
            return make()
        except ValueError:
            # The name clashes with another metric (e.g. one telemetry name used with and without a label).
            self._note_broken(key, "register")
            return None

    def _note_broken(self, key: str, what: str) -> None:
        if key in self._broken:
            return
        self._broken.add(key)
        log.warning("metrics: cannot %s %s (name clash or bad value); it is left out of /metrics", what, key)


class DifyAppsCollector(Collector):
    """Per Dify app, read at scrape time: the adaptive limit, calls in flight, callers queued, and counters
    of the overloads (429, 503, refusals, timeouts) and exhausted quotas the app answered with."""

    def __init__(self, source: DifyAppsSource) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only: the apps are not known before their first call

    def collect(self) -> Iterator[Metric]:
        try:
            apps = dict(self._source())
        except Exception:
            log.exception("could not read the Dify limiter's state for /metrics")
            return
        gauges = {
            "limit": GaugeMetricFamily(
                metric_name("dify_limit"), "Adaptive limit of Dify calls at once", labels=["app"]
            ),
            "in_flight": GaugeMetricFamily(
                metric_name("dify_in_flight"), "Dify calls in flight", labels=["app"]
            ),
            "queued": GaugeMetricFamily(
                metric_name("dify_queued"), "Answers waiting for a Dify call slot", labels=["app"]
            ),
        }
        overloads = CounterMetricFamily(
            metric_name("dify_app_overloads"),
            "Overload answers of a Dify app (429, 503, refused, timeout), by kind",
            labels=["app", "kind"],
        )
        quota = CounterMetricFamily(
            metric_name("dify_app_quota_exhausted"),
            "Answers saying the Dify app's quota is used up",
            labels=["app"],
        )
        for app, state in sorted(apps.items()):
            for field, gauge in gauges.items():
                gauge.add_metric([app], _number(state.get(field)))
            kinds = state.get("overloads")
            if isinstance(kinds, Mapping):
                for kind, n in sorted(kinds.items()):
                    overloads.add_metric([app, str(kind)], _number(n))
            quota.add_metric([app], _number(state.get("quota_exhausted")))
        yield from gauges.values()
        yield overloads
        yield quota


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
