from __future__ import annotations

import logging

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.routing import Route

from adapters.inbound.metrics import LATENCY_BUCKETS, MAX_LABEL_VALUES, PrometheusMetrics
from application.telemetry import Telemetry


async def scrape(metrics: PrometheusMetrics, accept: str = "") -> httpx.Response:
    app = Starlette(routes=[Route("/metrics", metrics.endpoint, methods=["GET"])])
    headers = {"accept": accept} if accept else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get("/metrics", headers=headers)


async def samples(metrics: PrometheusMetrics) -> list[Sample]:
    response = await scrape(metrics)
    assert response.status_code == 200
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in found if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {matches} in {[s.name for s in found]}"
    return matches[0]


def names(found: list[Sample]) -> set[str]:
    return {s.name for s in found}


@pytest.mark.anyio
async def test_a_fresh_exporter_lists_the_main_series_at_zero() -> None:
    found = await samples(PrometheusMetrics(Telemetry()))

    for counter in ("callbacks", "messages_pulled", "answered", "deduplicated", "ignored_too_old"):
        assert value(found, f"kfdify_{counter}_total") == 0
    assert value(found, "kfdify_replies_sent_total") == 0
    assert value(found, "kfdify_fallbacks_total") == 0
    for histogram in ("callback_ack", "pull", "dify", "send"):
        assert value(found, f"kfdify_{histogram}_seconds_count") == 0
        assert value(found, f"kfdify_{histogram}_seconds_bucket", le="+Inf") == 0
    assert value(found, "kfdify_in_flight_messages") == 0
    assert value(found, "kfdify_uptime_seconds") >= 0


@pytest.mark.anyio
async def test_counts_become_counters_named_after_the_telemetry_name() -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)

    telemetry.count("answered")
    telemetry.count("answered", 2)
    telemetry.count("pulls_coalesced")  # not pre-created: appears on first use
    found = await samples(metrics)

    assert value(found, "kfdify_answered_total") == 3
    assert value(found, "kfdify_pulls_coalesced_total") == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("telemetry_name", "label_name"),
    [
        ("dify_errors", "code"),
        ("wecom_errors", "errcode"),
        ("events", "event_type"),
        ("callback_events", "event"),
        ("callbacks_rejected", "status"),
        ("outcomes", "outcome"),
        ("something_new", "label"),
    ],
)
async def test_labelled_counts_get_a_named_label(telemetry_name: str, label_name: str) -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)

    telemetry.count_labelled(telemetry_name, "a")
    telemetry.count_labelled(telemetry_name, "a", 4)
    telemetry.count_labelled(telemetry_name, "b")
    found = await samples(metrics)

    assert value(found, f"kfdify_{telemetry_name}_total", **{label_name: "a"}) == 5
    assert value(found, f"kfdify_{telemetry_name}_total", **{label_name: "b"}) == 1


@pytest.mark.anyio
async def test_observations_fill_histograms_with_the_latency_buckets() -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)

    telemetry.observe("dify", 0.3)
    telemetry.observe("dify", 7.0)
    telemetry.observe("dify", 500.0)  # beyond the last bucket
    telemetry.observe("media_download", 0.002)  # a new series appears on first use
    found = await samples(metrics)

    assert value(found, "kfdify_dify_seconds_count") == 3
    assert value(found, "kfdify_dify_seconds_sum") == pytest.approx(507.3)
    assert value(found, "kfdify_dify_seconds_bucket", le="0.25") == 0
    assert value(found, "kfdify_dify_seconds_bucket", le="0.5") == 1
    assert value(found, "kfdify_dify_seconds_bucket", le="10.0") == 2
    assert value(found, "kfdify_dify_seconds_bucket", le="120.0") == 2
    assert value(found, "kfdify_dify_seconds_bucket", le="+Inf") == 3
    bucket_bounds = {s.labels["le"] for s in found if s.name == "kfdify_dify_seconds_bucket"}
    assert bucket_bounds == {str(float(b)) for b in LATENCY_BUCKETS} | {"+Inf"}
    assert value(found, "kfdify_media_download_seconds_count") == 1


@pytest.mark.anyio
async def test_values_counted_before_the_exporter_was_attached_are_mirrored() -> None:
    telemetry = Telemetry()
    telemetry.count("answered", 7)
    telemetry.count("resets")
    telemetry.count_labelled("dify_errors", "timeout", 2)
    telemetry.observe("send", 0.01)

    metrics = PrometheusMetrics(telemetry)
    telemetry.count("answered")
    telemetry.count_labelled("dify_errors", "timeout")
    found = await samples(metrics)

    assert value(found, "kfdify_answered_total") == 8
    assert value(found, "kfdify_resets_total") == 1
    assert value(found, "kfdify_dify_errors_total", code="timeout") == 3
    assert value(found, "kfdify_send_seconds_count") == 1


@pytest.mark.anyio
async def test_gauges_read_the_telemetry_when_scraped() -> None:
    telemetry = Telemetry()
    telemetry.started_at -= 120
    metrics = PrometheusMetrics(telemetry)

    telemetry.in_flight = 3
    found = await samples(metrics)

    assert value(found, "kfdify_in_flight_messages") == 3
    assert 120 <= value(found, "kfdify_uptime_seconds") < 200


@pytest.mark.anyio
async def test_each_exporter_has_its_own_registry() -> None:
    first, second = Telemetry(), Telemetry()
    first_metrics, second_metrics = PrometheusMetrics(first), PrometheusMetrics(second)

    first.count("answered", 2)
    second.count("answered", 5)

    assert value(await samples(first_metrics), "kfdify_answered_total") == 2
    assert value(await samples(second_metrics), "kfdify_answered_total") == 5


@pytest.mark.anyio
async def test_names_are_sanitised() -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)

    telemetry.count("weird-name.v2")
    telemetry.observe("dify/stream", 0.1)
    found = await samples(metrics)

    assert value(found, "kfdify_weird_name_v2_total") == 1
    assert value(found, "kfdify_dify_stream_seconds_count") == 1


@pytest.mark.anyio
async def test_a_name_used_with_and_without_a_label_never_breaks_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)

    with caplog.at_level(logging.WARNING, logger="kfdify.metrics"):
        telemetry.count("answered")
        telemetry.count_labelled("answered", "x")  # clashes with kfdify_answered_total
        telemetry.count_labelled("answered", "y")
    found = await samples(metrics)

    assert value(found, "kfdify_answered_total") == 1
    assert telemetry.labelled["answered"] == {"x": 1, "y": 1}  # telemetry itself is unaffected
    assert len([r for r in caplog.records if "answered" in r.getMessage()]) == 1  # logged once


@pytest.mark.anyio
async def test_label_values_are_capped() -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)

    for i in range(MAX_LABEL_VALUES + 5):
        telemetry.count_labelled("events", f"type_{i}")
    telemetry.count_labelled("events", "type_0")  # a known value keeps its own series
    found = await samples(metrics)

    series = [s for s in found if s.name == "kfdify_events_total"]
    assert len(series) == MAX_LABEL_VALUES + 1
    assert value(found, "kfdify_events_total", event_type="other") == 5
    assert value(found, "kfdify_events_total", event_type="type_0") == 2


@pytest.mark.anyio
async def test_the_endpoint_speaks_prometheus_text_and_openmetrics_on_request() -> None:
    telemetry = Telemetry()
    metrics = PrometheusMetrics(telemetry)
    telemetry.count("answered")

    plain = await scrape(metrics)
    assert plain.headers["content-type"].startswith("text/plain")
    assert "# TYPE kfdify_answered_total counter" in plain.text

    om = await scrape(metrics, accept="application/openmetrics-text; version=1.0.0")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(om.text)}  # type: ignore[no-untyped-call]
    assert families["kfdify_answered"].type == "counter"
    assert om.text.rstrip().endswith("# EOF")
