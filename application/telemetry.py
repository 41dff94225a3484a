"""Counters and latencies the service keeps in-process, read by /status and /metrics."""

from __future__ import annotations

import time
from collections import defaultdict, deque
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


@dataclass
class _Series:
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    count: int = 0
    total: float = 0.0


class Telemetry:
    """Thread-unsafe by design: everything runs on one event loop."""

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
        self.labelled[name][label] += n
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
