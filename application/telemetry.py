"""Counters and latencies the service keeps in-process, read by /status and /metrics."""

from __future__ import annotations

import re
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

# Ties a callback to the pulls, Dify calls and replies it caused: tasks copy the context they start in.
correlation_id: ContextVar[str] = ContextVar("correlation_id", default="-")

# Names of the latency series (seconds).
CALLBACK_ACK = "callback_ack"
PULL = "pull"
DIFY = "dify"
SEND = "send"


# Labels can come from outside (WeCom errcodes, Dify error codes, callback event types): each labelled counter
# keeps at most this many distinct labels besides the known ones below; the rest count as OTHER.
MAX_LABELS = 200  # as many as /metrics keeps per counter
OTHER = "other"
_LABEL_SHAPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Errcodes a kf bot meets (docs/wecom-kf.md, error codes) and "None" (unreachable): always their own label.
KNOWN_WECOM_ERRCODES = frozenset(
    str(code)
    for code in (
        -1, 40001, 40003, 40004, 40005, 40006, 40007, 40008, 40009, 40010, 40011, 40013, 40014, 40058,
        40082, 40091, 40201, 41001, 41004, 42001, 42009, 44001, 44004, 45002, 45009, 45033, 48002, 60020,
        95000, 95001, 95002, 95003, 95004, 95007, 95008, 95009, 95010, 95011, 95012, 95013, 95014, 95015,
        95016, 95017, 95018, 95019, 95020, 95021, 95022, 95023, 95024, 95025, 95028, 95029, 95030, 830002,
    )
) | {"None"}  # fmt: skip
# Dify's error codes (docs/dify.md) and the adapter's own.
KNOWN_DIFY_CODES = frozenset(
    {
        "app_unavailable", "app_not_found", "app_abnormal_status", "app_api_disabled", "bad_request",
        "completion_request_error", "conversation_completed", "conversation_gone",
        "conversation_not_exists", "file_too_large", "forbidden", "internal_server_error", "invalid_param",
        "model_currently_not_support", "not_found", "provider_not_initialize", "provider_quota_exceeded",
        "rate_limit_error",
        "too_many_requests", "unsupported_file_type", "unauthorized", "workspace_archived",
        "workspace_not_found", "bad_response", "conversation_id", "idle_timeout", "stream_incomplete",
        "timeout", "unreachable", "workflow_failed", "workflow_paused",
    }
)  # fmt: skip
KNOWN_LABELS: dict[str, frozenset[str]] = {
    "wecom_errors": KNOWN_WECOM_ERRCODES,
    "handoff_failures": KNOWN_WECOM_ERRCODES,
    "dify_errors": KNOWN_DIFY_CODES,
}


def bounded_label(name: str, label: str, seen: Mapping[str, int]) -> str:
    """The label `count_labelled(name, label)` records: a known label as is; any other only when it looks like
    a code (letters, digits, `_.:-`, at most 64) and `name` has fewer than MAX_LABELS such labels; else OTHER.
    Keeps /status and /metrics from growing a label per distinct value an outsider sends."""
    known = KNOWN_LABELS.get(name, frozenset())
    if label in known or label in seen:
        return label
    if not _LABEL_SHAPE.fullmatch(label):
        return OTHER
    unknown = sum(1 for seen_label in seen if seen_label not in known and seen_label != OTHER)
    return label if unknown < MAX_LABELS else OTHER


@dataclass
class _Series:
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    count: int = 0
    total: float = 0.0


class Telemetry:
    """Thread-unsafe by design: everything runs on the pipeline's event loop (the webhook, on uvicorn's loop,
    hands its counts over: adapters/inbound/pipeline_loop.py)."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.counters: dict[str, int] = defaultdict(int)
        self.labelled: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.series: dict[str, _Series] = defaultdict(_Series)
        self.in_flight = 0
        self.last_seen: dict[str, dict[str, object]] = {}
        self.listeners: list[TelemetryListener] = []

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        for listener in self.listeners:
            listener.on_count(name, n, None)

    def count_labelled(self, name: str, label: str, n: int = 1) -> None:
        """Count `n` under `label`, bounded by `bounded_label`."""
        counter = self.labelled[name]
        label = bounded_label(name, label, counter)
        counter[label] += n
        for listener in self.listeners:
            listener.on_count(name, n, label)

    def observe(self, name: str, seconds: float) -> None:
        s = self.series[name]
        s.samples.append(seconds)
        s.count += 1
        s.total += seconds
        for listener in self.listeners:
            listener.on_observe(name, seconds)

    def reachability(self, dependency: str, ok: bool, detail: str = "") -> None:
        """Remember how a dependency answered last (for /status)."""
        self.last_seen[dependency] = {"ok": ok, "at": time.time(), "detail": detail}

    def percentiles(self, name: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float | None]:
        samples = sorted(self.series[name].samples) if name in self.series else []
        out: dict[str, float | None] = {}
        for q in qs:
            key = f"p{int(q * 100)}"
            if not samples:
                out[key] = None
                continue
            idx = min(len(samples) - 1, int(q * len(samples)))
            out[key] = round(samples[idx], 4)
        return out


class TelemetryListener(Protocol):
    """Something that mirrors telemetry elsewhere (the Prometheus exporter)."""

    def on_count(self, name: str, n: int, label: str | None) -> None: ...

    def on_observe(self, name: str, seconds: float) -> None: ...
