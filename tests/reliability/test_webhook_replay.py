"""A captured, validly signed callback replayed any number of times, at any age, does no harm.

The webhook has no timestamp freshness window on purpose (see its module docstring): a callback is only a
pull trigger, so a replay at worst causes a pull, and pulls are coalesced and answer each message once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from adapters.outbound.fake_dify import FakeChatEngine
from tests.reliability.hostile_input import KF, InProcess, in_process, notice_xml, signed_callback

pytestmark = pytest.mark.anyio

REPLAYS = 50


@pytest.fixture
async def app() -> AsyncIterator[InProcess]:
    async with in_process() as running:
        yield running


def answers(app: InProcess, customer: str) -> list[str]:
    return [s.text for s in app.world.sent if s.customer.external_userid == customer]


def questions(app: InProcess) -> int:
    engine: FakeChatEngine = app.container.adapters.engine()
    return len(engine.questions)


async def test_a_callback_replayed_50_times_is_answered_once(app: InProcess) -> None:
    app.world.add_customer_text(KF, "wmReplay", "你好")
    query, body = signed_callback(notice_xml(), timestamp=str(int(time.time())), nonce="777")
    first = await app.client.post("/webhook", params=query, content=body)
    assert first.status_code == 200
    await app.settle()
    assert answers(app, "wmReplay") == ["答：你好"]
    pulls_before = app.pulls

    # The same bytes, 50 times, all at once: every one is "valid", each only asks for a pull.
    replays = await asyncio.gather(
        *(app.client.post("/webhook", params=query, content=body) for _ in range(REPLAYS))
    )
    assert {r.status_code for r in replays} == {200}
    await app.settle()
    replay_pulls = app.pulls - pulls_before
    assert 1 <= replay_pulls < REPLAYS, "replays arriving together are coalesced into few pulls"
    assert app.counter("pulls_coalesced") > 0

    # ... and 50 more, one after another (each may pull: nothing new is there).
    for _ in range(REPLAYS):
        assert (await app.client.post("/webhook", params=query, content=body)).status_code == 200
    await app.settle()

    assert answers(app, "wmReplay") == ["答：你好"]
    assert questions(app) == 1

    # The replays broke nothing: the next genuine message is answered as usual.
    app.world.add_customer_text(KF, "wmReplay", "还在吗")
    fresh_query, fresh_body = signed_callback(notice_xml(), timestamp=str(int(time.time())), nonce="778")
    assert (await app.client.post("/webhook", params=fresh_query, content=fresh_body)).status_code == 200
    await app.settle()
    assert answers(app, "wmReplay") == ["答：你好", "答：还在吗"]


@pytest.mark.parametrize(
    "age_s",
    [3 * 24 * 3600, 365 * 24 * 3600, -24 * 3600, int(time.time())],
    ids=["three days old", "a year old", "a day in the future", "epoch"],
)
async def test_old_and_future_timestamps_are_accepted_and_only_pull(app: InProcess, age_s: int) -> None:
    # The chosen behaviour: no freshness window, so clock skew between WeCom and us never loses a callback.
    app.world.add_customer_text(KF, "wmClock", "时间")
    timestamp = str(int(time.time()) - age_s)
    query, body = signed_callback(notice_xml(), timestamp=timestamp, nonce="9")
    for _ in range(3):
        assert (await app.client.post("/webhook", params=query, content=body)).status_code == 200
        await app.settle()
    assert answers(app, "wmClock") == ["答：时间"]
    assert questions(app) == 1


async def test_a_replay_with_a_changed_timestamp_or_nonce_is_refused(app: InProcess) -> None:
    # Timestamp and nonce are signed: a replayer cannot refresh them without the Token.
    query, body = signed_callback(notice_xml(), timestamp="1700000000", nonce="5")
    for changed in ({"timestamp": str(int(time.time()))}, {"nonce": "6"}):
        response = await app.client.post("/webhook", params={**query, **changed}, content=body)
        assert response.status_code == 403
    await app.settle()
    assert app.pulls == 0
