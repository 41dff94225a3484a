"""The console's per-instance history: windows, per-minute series, recent customers, recent problems."""

from __future__ import annotations

import time

from application.hints import dify_hint_for, wecom_hint_for
from application.insights import Insights
from application.log_context import handling
from application.telemetry import Telemetry
from domain.messages import InboundMessage, Origin
from tests.support.containers import FakeClock


def _message(customer: str, kf: str = "wk1") -> InboundMessage:
    return InboundMessage(
        msgid=f"m-{customer}",
        open_kfid=kf,
        external_userid=customer,
        send_time=0,
        origin=Origin.CUSTOMER,
        msgtype="text",
    )


def _wired(start: float | None = None) -> tuple[Telemetry, Insights, FakeClock]:
    clock = FakeClock(start if start is not None else time.mktime((2026, 12, 2, 10, 0, 30, 0, 0, -1)))
    telemetry = Telemetry()
    insights = Insights(instance="i-1", clock=clock.now, max_customers=3, max_problems=5)
    telemetry.listeners.append(insights)
    return telemetry, insights, clock


def test_counters_land_in_today_and_the_last_hour_by_their_status_names() -> None:
    telemetry, insights, clock = _wired()
    telemetry.count("answered")
    telemetry.count_labelled("handoffs", "keyword")
    telemetry.count_labelled("rate_limited", "notify")
    telemetry.count_labelled("media_received", "image")
    telemetry.count("pulls")  # not one the console shows
    clock.advance(61 * 60)
    telemetry.count("answered", 2)
    windows = insights.windows()
    assert windows["today"]["answered"] == 3 and windows["last_hour"]["answered"] == 2
    assert windows["today"]["handoffs"] == 1 and windows["last_hour"]["handoffs"] == 0
    assert windows["today"]["rate_limited"] == windows["today"]["media_received"] == 1
    assert "pulls" not in windows["today"]


def test_today_starts_over_at_local_midnight() -> None:
    telemetry, insights, clock = _wired(time.mktime((2026, 12, 2, 23, 59, 0, 0, 0, -1)))
    telemetry.count("answered")
    clock.advance(120)
    assert insights.windows()["today"]["answered"] == 0
    assert insights.windows()["last_hour"]["answered"] == 1


def test_the_per_minute_series_covers_the_last_hour_with_dify_percentiles() -> None:
    telemetry, insights, clock = _wired()
    for seconds in (1.0, 2.0, 3.0, 4.0):
        telemetry.observe("dify", seconds)
    telemetry.observe("send", 9.0)  # not Dify
    telemetry.count("answered")
    clock.advance(60)
    telemetry.count("answered", 3)
    series = insights.per_minute()
    assert len(series) == 60
    assert [p["answered"] for p in series[-2:]] == [1, 3]
    assert series[-2]["dify_p50"] == 3.0 and series[-2]["dify_p95"] == 4.0
    assert series[-1]["dify_p50"] is None
    assert series[-1]["minute"] - series[0]["minute"] == 59 * 60
    clock.advance(3600)
    assert sum(p["answered"] for p in insights.per_minute()) == 0


def test_recent_customers_are_bounded_and_newest_first() -> None:
    telemetry, insights, clock = _wired()
    for customer in ("wmA", "wmB", "wmC", "wmD"):
        with handling(_message(customer)):
            telemetry.count_labelled("outcomes", "answered")
        clock.advance(1)
    with handling(_message("wmB")):
        telemetry.count_labelled("outcomes", "handoff")
    assert [c.customer for c in insights.customers()] == ["wmB", "wmD", "wmC"]  # wmA fell out
    bob = insights.customer("wk1", "wmB")
    assert bob is not None and bob.messages == 2 and bob.last_outcome == "handoff"
    assert [o["outcome"] for o in bob.to_dict()["outcomes"]] == ["handoff", "answered"]
    assert [c.customer for c in insights.customers("wmd")] == ["wmD"]
    telemetry.count_labelled("outcomes", "answered")  # outside any message: nobody to attribute it to
    assert len(insights.customers()) == 3


def test_a_customer_keeps_at_most_ten_outcomes() -> None:
    telemetry, insights, _ = _wired()
    with handling(_message("wmA")):
        for _ in range(25):
            telemetry.count_labelled("outcomes", "answered")
    activity = insights.customer("wk1", "wmA")
    assert activity is not None and activity.messages == 25 and len(activity.outcomes) == 10


def test_problems_are_bounded_newest_first_with_checks_hints() -> None:
    telemetry, insights, clock = _wired()
    with handling(_message("wmA")):
        telemetry.count_labelled("dify_errors", "timeout")
    telemetry.count_labelled("wecom_errors", "40001")
    telemetry.count_labelled("wecom_errors", "None")
    telemetry.count_labelled("send_failures", "10")
    telemetry.count_labelled("handoff_failures", "95013")
    problems = insights.problems()
    assert [p.kind for p in problems] == [
        "handoff_refused",
        "send_failure",
        "wecom_errcode",
        "wecom_errcode",
        "dify_error",
    ]
    assert problems[-1].customer == "wmA" and problems[-1].hint == dify_hint_for("timeout")
    assert problems[2].hint == wecom_hint_for(None) and problems[3].hint == wecom_hint_for(40001)
    assert "rejects" in problems[1].summary or "turned off" in problems[1].hint
    telemetry.count_labelled("media_declined", "too_large")
    insights.store_seen(degraded=True, backend="memcached")
    insights.store_seen(degraded=True, backend="memcached")  # still degraded: not a new problem
    kinds = [p.kind for p in insights.problems()]
    assert len(kinds) == 5 and kinds[:2] == ["store_degraded", "media_failure"]
    assert kinds.count("store_degraded") == 1


def test_status_section_names_the_instance() -> None:
    telemetry, insights, _ = _wired()
    telemetry.count("fallbacks")
    section = insights.status_section()
    assert section["instance"] == "i-1" and section["windows"]["today"]["fallbacks"] == 1
