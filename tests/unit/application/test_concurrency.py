"""Adaptive Dify concurrency: the limit follows what each app sustains, waiters are served fairly, and a
rejected ask is retried within its deadline (or not at all when a quota is used up).

Time is virtual: the limiter reads a fake clock, and the simulations advance it only when every simulated
caller is waiting (in the limiter's queue or on a virtual timer). Nothing sleeps for real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable, Hashable
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from application.concurrency import (
    SLOW_START_ROOM,
    AdaptiveLimiter,
    AppSnapshot,
    LimiterSettings,
    Slot,
    dify_app_key,
)
from application.dify_retry import (
    Overload,
    RetryPolicy,
    RetrySettings,
    is_quota_exhausted,
    overload_of,
    parse_retry_after,
)
from application.errors import ChatEngineError

pytestmark = pytest.mark.anyio
APP = "dify.example#app"
START = 1_800_000_000.0


class VirtualClock:
    """The Clock port, plus timers that fire only when the test advances time."""

    def __init__(self, start: float = START) -> None:
        self.value = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds

    def sleep(self, seconds: float) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.value + max(seconds, 0.0), next(self._order), future))
        return future

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, future in self._timers if not future.done())

    def fire_next(self) -> None:
        """Move time to the earliest timer and wake everything due then."""
        while self._timers and self._timers[0][2].done():
            heapq.heappop(self._timers)
        assert self._timers, "nothing is scheduled: the simulation is stuck"
        self.value = max(self.value, self._timers[0][0])
        while self._timers and self._timers[0][0] <= self.value:
            _, _, future = heapq.heappop(self._timers)
            if not future.done():
                future.set_result(None)


async def until(condition: Callable[[], bool], *, spins: int = 20_000) -> None:
    """Let the event loop run until `condition` holds (no real time passes)."""
    for _ in range(spins):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition(), "condition never became true"


def limiter_with(clock: VirtualClock | None = None, **settings: Any) -> AdaptiveLimiter:
    base = LimiterSettings(min_limit=1, max_limit=1000, initial_limit=4)
    return AdaptiveLimiter(clock=clock or VirtualClock(), settings=replace(base, **settings))


class Holders:
    """Tasks that take a slot each and keep it until told to leave."""

    def __init__(self, limiter: AdaptiveLimiter, app: str = APP) -> None:
        self.limiter = limiter
        self.app = app
        self.slots: list[Slot] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._leave: dict[int, asyncio.Event] = {}

    def start(self, n: int, customer: Callable[[int], Hashable] = lambda i: f"c{i}") -> None:
        for _ in range(n):
            i = len(self.tasks)
            self._leave[i] = asyncio.Event()
            self.tasks.append(asyncio.create_task(self._hold(i, customer(i))))

    async def _hold(self, i: int, customer: Hashable) -> None:
        async with self.limiter.slot(self.app, customer) as slot:
            self.slots.append(slot)
            await self._leave[i].wait()

    def leave(self, *indices: int) -> None:
        for i in indices:
            self._leave[i].set()

    async def granted(self, n: int) -> None:
        await until(lambda: len(self.slots) >= n)

    async def finish(self) -> None:
        for event in self._leave.values():
            event.set()
        await asyncio.gather(*self.tasks)


def snap(limiter: AdaptiveLimiter, app: str = APP) -> AppSnapshot:
    return limiter.snapshot()[app]


# --- growth -----------------------------------------------------------------------------------------


async def test_slow_start_doubles_the_limit_each_round_of_accepted_requests() -> None:
    limiter = limiter_with(initial_limit=4)
    holders = Holders(limiter)
    holders.start(100)
    await holders.granted(4)
    assert (snap(limiter).limit, snap(limiter).in_flight, snap(limiter).queued) == (4, 4, 96)

    for expected in (8, 16, 32):
        for slot in list(holders.slots):
            slot.accepted()
            slot.accepted()  # reported twice: counts once
        await holders.granted(expected)
        state = snap(limiter)
        assert (state.limit, state.in_flight, state.queued, state.slow_start) == (
            expected,
            expected,
            100 - expected,
            True,
        )
    await holders.finish()
    assert snap(limiter).in_flight == 0


async def test_a_success_grows_the_limit_when_nobody_reported_acceptance() -> None:
    limiter = limiter_with(initial_limit=4)
    holders = Holders(limiter)
    holders.start(10)
    await holders.granted(4)
    for slot in holders.slots[:4]:
        slot.success(1.0)
    await holders.granted(8)
    assert snap(limiter).limit == 8


async def test_the_limit_does_not_grow_while_it_is_not_used() -> None:
    limiter = limiter_with(initial_limit=16)
    for i in range(200):
        async with limiter.slot(APP, f"c{i % 3}") as slot:
            slot.accepted()
            slot.success(1.0)
    state = snap(limiter)
    assert (state.limit, state.succeeded, state.granted, state.in_flight) == (16, 200, 200, 0)


async def test_after_an_overload_growth_is_additive_one_per_round_trip() -> None:
    limiter = limiter_with(initial_limit=20)
    holders = Holders(limiter)
    holders.start(200)
    await holders.granted(20)
    holders.slots[-1].overload(Overload.UNAVAILABLE)  # 20 -> 14, out of slow start
    assert snap(limiter).limit == 14 and not snap(limiter).slow_start
    holders.leave(19)
    await until(lambda: snap(limiter).in_flight == 19)
    for slot in holders.slots[:19]:
        slot.success(1.0)
    state = snap(limiter)
    # 19 successes at a limit of 14: +1/limit each, so about one more, never slow start's +19.
    assert state.limit == 15
    await holders.finish()


async def test_latency_inflation_stops_growth() -> None:
    async def scenario(recent_latency: float) -> int:
        limiter = limiter_with(initial_limit=10, short_window=4, min_long_samples=8)
        for n in range(43):  # one at a time: the limit is not used, the answers only set the latencies
            async with limiter.slot(APP, "warm") as slot:
                slot.success(1.0 if n < 40 else recent_latency)
        assert snap(limiter).limit == 10
        holders = Holders(limiter)
        holders.start(40)
        await holders.granted(10)
        for slot in holders.slots[:10]:
            slot.success(recent_latency)
        limit = snap(limiter).limit
        await holders.finish()
        return limit

    assert await scenario(1.0) == 20  # steady latency: slow start doubles the limit
    # 5 s answers lately against a 1 s baseline: the short-window median is 5 s > 2 × 1 s.
    assert await scenario(5.0) == 10


async def test_slow_start_runs_again_after_a_long_quiet_spell() -> None:
    clock = VirtualClock()
    limiter = limiter_with(clock, initial_limit=10, slow_start_restart_s=300)
    holders = Holders(limiter)
    holders.start(100)
    await holders.granted(10)
    holders.slots[-1].overload(Overload.TIMEOUT)  # 10 -> 7
    assert snap(limiter).limit == 7
    holders.slots[0].accepted()
    assert snap(limiter).limit == 7  # +1/7 only
    clock.advance(301)
    holders.slots[8].accepted()  # sent with 9 in flight: slow start again lets the app try 18
    assert snap(limiter).slow_start and snap(limiter).limit == 18
    await holders.finish()


# --- back-off ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Overload))
async def test_each_overload_kind_shrinks_the_limit_once_per_episode(kind: Overload) -> None:
    # A 429 is the app's concurrency cap, known to lie just below what was in flight: ×0.9; the rest ×0.7.
    first, second = (18, 16) if kind is Overload.RATE_LIMITED else (14, 9)  # 18 × 0.9 = 16.2, 14 × 0.7 = 9.8
    limiter = limiter_with(initial_limit=20)
    holders = Holders(limiter)
    holders.start(60)
    await holders.granted(20)
    for slot in reversed(holders.slots[:20]):  # the whole burst fails: one decrease
        slot.overload(kind)
    state = snap(limiter)
    assert (state.limit, state.decreases, state.overloads[kind.value], state.slow_start) == (
        first,
        1,
        20,
        False,
    )
    assert state.failed == 20

    holders.leave(*range(20))
    await until(lambda: len(holders.slots) == 20 + first)  # new grants, all after the decrease
    holders.slots[20].overload(kind)
    state = snap(limiter)
    assert (state.limit, state.decreases) == (second, 2)
    await holders.finish()


async def test_a_429_shrinks_from_what_was_in_flight_when_it_was_sent() -> None:
    limiter = limiter_with(initial_limit=100)
    holders = Holders(limiter)
    holders.start(30)
    await holders.granted(30)
    holders.slots[29].overload(Overload.RATE_LIMITED)  # the app refused the 30th: its ceiling is below 30
    assert snap(limiter).limit == 27  # 30 × 0.9, not 100 × 0.9
    await holders.finish()


async def test_the_limit_stays_within_its_floor_and_ceiling() -> None:
    limiter = limiter_with(initial_limit=8, min_limit=4, max_limit=12)
    holders = Holders(limiter)
    holders.start(40)
    await holders.granted(8)
    for _ in range(4):
        for slot in list(holders.slots):
            slot.accepted()
        await until(lambda: snap(limiter).in_flight == snap(limiter).limit)
    assert snap(limiter).limit == 12 and snap(limiter).in_flight == 12

    await holders.finish()
    for _ in range(10):  # episode after episode, each request sent after the previous decrease
        async with limiter.slot(APP, "c") as slot:
            slot.overload(Overload.REFUSED)
    state = snap(limiter)
    assert (state.limit, state.decreases, state.in_flight) == (4, 10, 0)


def test_settings_refuse_impossible_bounds() -> None:
    with pytest.raises(ValueError):
        LimiterSettings(min_limit=0)
    with pytest.raises(ValueError):
        LimiterSettings(min_limit=10, max_limit=5)
    with pytest.raises(ValueError):
        LimiterSettings(backoff_ratio=1.0)
    assert LimiterSettings(min_limit=2, max_limit=3, initial_limit=50).initial_limit == 50
    assert LimiterSettings.from_config(concurrency=1000, min_concurrency=4) == LimiterSettings(
        max_limit=1000, min_limit=4, initial_limit=32
    )
    # An old-style small DIFY_CONCURRENCY still means "at most that many".
    small = LimiterSettings.from_config(concurrency=2, min_concurrency=4)
    assert (small.max_limit, small.min_limit, small.initial_limit) == (2, 2, 2)
    odd = LimiterSettings.from_config(concurrency=0, min_concurrency=0)
    assert (odd.max_limit, odd.min_limit, odd.initial_limit) == (1, 1, 1)
    assert (
        AdaptiveLimiter(clock=VirtualClock(), settings=LimiterSettings(min_limit=2, max_limit=3)).limit(APP)
        == 3
    )


async def test_apps_are_limited_separately() -> None:
    limiter = limiter_with(initial_limit=10)
    busy, calm = Holders(limiter, "busy"), Holders(limiter, "calm")
    busy.start(30)
    calm.start(5)
    await busy.granted(10)
    await calm.granted(5)
    busy.slots[-1].overload(Overload.RATE_LIMITED)
    for slot in busy.slots:
        slot.accepted()
    assert limiter.snapshot()["calm"].limit == 10 and limiter.snapshot()["calm"].decreases == 0
    # 10 -> 9 on the 429, then +1/limit for each of the 9 other accepted requests: just under 10.
    assert limiter.snapshot()["busy"].limit == 9 and limiter.snapshot()["busy"].queued == 20
    await busy.finish()
    await calm.finish()


# --- outcomes from errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind", "quota"),
    [
        (
            ChatEngineError("too_many_requests", "Too many requests.", status=429, retryable=True),
            Overload.RATE_LIMITED,
            False,
        ),
        (ChatEngineError("http_429", "HTTP 429", status=429, retryable=True), Overload.RATE_LIMITED, False),
        (ChatEngineError("http_503", "HTTP 503", status=503, retryable=True), Overload.UNAVAILABLE, False),
        (ChatEngineError("http_502", "Bad Gateway", status=502, retryable=True), Overload.UNAVAILABLE, False),
        (ChatEngineError("http_504", "Gateway Timeout", status=504, retryable=True), Overload.TIMEOUT, False),
        (ChatEngineError("timeout", "read: ReadTimeout", retryable=True), Overload.TIMEOUT, False),
        (ChatEngineError("unreachable", "ConnectError: refused", retryable=True), Overload.REFUSED, False),
        (ChatEngineError("unreachable", "UnsupportedProtocol", retryable=False), None, False),
        (ChatEngineError("idle_timeout", "only pings", retryable=True), None, False),
        (ChatEngineError("internal_server_error", "boom", status=500, retryable=True), None, False),
        (ChatEngineError("invalid_param", "query is required", status=400), None, False),
        (
            ChatEngineError(
                "completion_request_error", "[openai] Rate Limit Error, on requests per min", status=400
            ),
            Overload.RATE_LIMITED,
            False,
        ),
        (
            ChatEngineError("completion_request_error", "Read timed out. (read timeout=60)", status=400),
            None,
            False,
        ),
        (ChatEngineError("rate_limit_error", "Rate Limit Error", status=429), None, True),
        (
            ChatEngineError("rate_limit_error", "Rate limit reached on tokens per min (TPM)", status=429),
            Overload.RATE_LIMITED,
            False,
        ),
        (
            ChatEngineError("too_many_requests", "The daily quota of this app is used up", status=429),
            None,
            True,
        ),
        (
            ChatEngineError(
                "completion_request_error", "429 Resource has been exhausted, try again", status=400
            ),
            Overload.RATE_LIMITED,
            False,
        ),
        (
            ChatEngineError("provider_quota_exceeded", "Your quota ... has been exhausted.", status=400),
            None,
            True,
        ),
        (ChatEngineError("app_quota_exceeded", "", status=429), None, True),
        (
            ChatEngineError(
                "completion_request_error", "You exceeded your current quota, check billing", status=400
            ),
            None,
            True,
        ),
    ],
)
def test_errors_map_to_overload_kinds(error: ChatEngineError, kind: Overload | None, quota: bool) -> None:
    assert overload_of(error) is kind
    assert is_quota_exhausted(error) is quota


async def test_an_error_leaving_the_block_is_recorded_by_its_kind() -> None:
    limiter = limiter_with(initial_limit=10)
    with pytest.raises(ChatEngineError):
        async with limiter.slot(APP, "c"):
            raise ChatEngineError("too_many_requests", "Too many requests.", status=429, retryable=True)
    with pytest.raises(ChatEngineError):
        async with limiter.slot(APP, "c"):
            raise ChatEngineError("rate_limit_error", "Rate Limit Error", status=429)
    with pytest.raises(ChatEngineError):
        async with limiter.slot(APP, "c"):
            raise ChatEngineError("invalid_param", "query is required", status=400)
    with pytest.raises(RuntimeError):
        async with limiter.slot(APP, "c"):
            raise RuntimeError("bug")
    async with limiter.slot(APP, "c") as slot:
        slot.overload(Overload.UNAVAILABLE)
        slot.success(1.0)  # a second report is ignored
    state = snap(limiter)
    assert state.overloads == {"rate_limited": 1, "unavailable": 1, "refused": 0, "timeout": 0}
    assert (state.quota_exhausted, state.failed, state.succeeded, state.in_flight) == (1, 5, 0, 0)
    # The 429 came with 1 call in flight: the app's ceiling is reached by others, down to the floor.
    assert (state.decreases, state.limit) == (2, 1)


# --- fairness and cancellation ----------------------------------------------------------------------


async def test_customers_take_turns_and_each_keeps_their_own_order() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    served: list[str] = []
    gate = Holders(limiter)
    gate.start(1, lambda i: "gate")
    await gate.granted(1)

    async def ask(customer: str, n: int) -> None:
        async with limiter.slot(APP, customer) as slot:
            served.append(f"{customer}{n}")
            slot.success(1.0)

    tasks = [asyncio.create_task(ask("heavy", n)) for n in range(1, 51)]
    tasks += [asyncio.create_task(ask(f"light{k}-", 1)) for k in range(10)]
    await until(lambda: snap(limiter).queued == 60)
    assert snap(limiter).waiting_customers == 11
    await gate.finish()
    await asyncio.gather(*tasks)
    assert served[:12] == ["heavy1"] + [f"light{k}-1" for k in range(10)] + ["heavy2"]
    assert served[11:] == [f"heavy{n}" for n in range(2, 51)]


async def test_a_retry_waits_at_the_head_of_the_queue() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    served: list[str] = []
    gate = Holders(limiter)
    gate.start(1, lambda i: "gate")
    await gate.granted(1)

    async def ask(customer: str, *, retry: bool = False) -> None:
        async with limiter.slot(APP, customer, retry=retry) as slot:
            served.append(customer)
            slot.success(1.0)

    tasks = [asyncio.create_task(ask(f"c{k}")) for k in range(5)]
    await until(lambda: snap(limiter).queued == 5)
    tasks.append(asyncio.create_task(ask("refused-earlier", retry=True)))
    await until(lambda: snap(limiter).queued == 6)
    await gate.finish()
    await asyncio.gather(*tasks)
    assert served == ["refused-earlier", "c0", "c1", "c2", "c3", "c4"]


async def test_round_robin_between_several_heavy_customers() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    served: list[str] = []
    gate = Holders(limiter)
    gate.start(1, lambda i: "gate")
    await gate.granted(1)

    async def ask(customer: str, n: int) -> None:
        async with limiter.slot(APP, customer):
            served.append(f"{customer}{n}")

    tasks = [asyncio.create_task(ask(c, n)) for c in "ab" for n in range(3)]
    tasks.append(asyncio.create_task(ask("c", 0)))
    await until(lambda: snap(limiter).queued == 7)
    await gate.finish()
    await asyncio.gather(*tasks)
    assert served == ["a0", "b0", "c0", "a1", "b1", "a2", "b2"]


async def test_a_cancelled_waiter_leaves_the_queue_without_leaking_a_slot() -> None:
    limiter = limiter_with(initial_limit=2, max_limit=2)
    holders = Holders(limiter)
    holders.start(5)
    await holders.granted(2)
    assert snap(limiter).queued == 3
    holders.tasks[3].cancel()  # a waiter in the middle
    await until(lambda: holders.tasks[3].done())
    assert (snap(limiter).queued, snap(limiter).waiting_customers, snap(limiter).in_flight) == (2, 2, 2)
    holders.leave(0, 1, 2, 4)
    await asyncio.gather(*(holders.tasks[i] for i in (0, 1, 2, 4)))
    assert [s.seq for s in holders.slots] == [1, 2, 3, 4]
    state = snap(limiter)
    assert (state.in_flight, state.queued, state.granted) == (0, 0, 4)


async def test_a_waiter_cancelled_right_after_its_turn_came_gives_the_turn_on() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    first = await limiter.acquire(APP, "first")
    second = asyncio.create_task(limiter.acquire(APP, "second"))
    third = asyncio.create_task(limiter.acquire(APP, "third"))
    await until(lambda: snap(limiter).queued == 2)
    limiter.release(first)  # the turn goes to `second` at once...
    assert (snap(limiter).queued, snap(limiter).in_flight) == (1, 1)
    second.cancel()  # ...which is cancelled before it could run
    slot = await third
    assert second.cancelled()
    assert (snap(limiter).queued, snap(limiter).in_flight) == (0, 1)
    limiter.release(slot)
    assert snap(limiter).in_flight == 0


async def test_a_customer_whose_first_waiter_was_just_cancelled_keeps_their_turn() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    gate = await limiter.acquire(APP, "gate")
    served: list[str] = []

    async def ask(customer: str, label: str) -> None:
        async with limiter.slot(APP, customer):
            served.append(label)

    a1 = asyncio.create_task(ask("a", "a1"))
    rest = [asyncio.create_task(ask("a", "a2")), asyncio.create_task(ask("b", "b1"))]
    await until(lambda: snap(limiter).queued == 3)
    a1.cancel()  # still in the queue when the turn is handed out in the same instant
    limiter.release(gate)
    await asyncio.gather(*rest)
    assert a1.cancelled() and served == ["a2", "b1"]
    assert (snap(limiter).queued, snap(limiter).in_flight) == (0, 0)


async def test_an_accepted_call_that_then_times_out_still_shrinks_the_limit() -> None:
    limiter = limiter_with(initial_limit=10)
    holders = Holders(limiter)
    holders.start(10)
    await holders.granted(10)
    slot = holders.slots[-1]
    slot.accepted()  # the stream started (with the limit used: slow start lets the app try 20)...
    assert snap(limiter).limit == 20
    slot.overload(Overload.TIMEOUT)  # ...and then stalled
    assert (snap(limiter).limit, snap(limiter).decreases) == (14, 1)
    await holders.finish()


async def test_a_deadline_while_waiting_drops_the_waiter() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    holders = Holders(limiter)
    holders.start(1)
    await holders.granted(1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await limiter.acquire(APP, "late")
    assert (snap(limiter).queued, snap(limiter).in_flight) == (0, 1)
    await holders.finish()
    async with limiter.slot(APP, "next"):
        assert snap(limiter).in_flight == 1
    assert snap(limiter).in_flight == 0


async def test_cancelling_a_caller_that_holds_a_slot_gives_it_back() -> None:
    limiter = limiter_with(initial_limit=1, max_limit=1)
    holders = Holders(limiter)
    holders.start(2)
    await holders.granted(1)
    holders.tasks[0].cancel()
    await holders.granted(2)
    assert snap(limiter).in_flight == 1 and snap(limiter).failed == 1
    holders.leave(1)
    await holders.tasks[1]
    assert snap(limiter).in_flight == 0


# --- snapshot ---------------------------------------------------------------------------------------


async def test_snapshot_reports_limit_in_flight_queue_and_totals() -> None:
    limiter = limiter_with(initial_limit=3)
    assert limiter.snapshot() == {}
    holders = Holders(limiter)
    holders.start(9, lambda i: f"c{i % 2}")
    await holders.granted(3)
    holders.slots[2].success(2.0)  # sent with 3 in flight: slow start lets the app try 6
    await holders.granted(6)
    holders.slots[1].overload(Overload.TIMEOUT)  # 6 -> 4.2, counted as a failure
    holders.slots[0].quota_exhausted()
    state = snap(limiter)
    assert (state.limit, state.in_flight, state.queued, state.waiting_customers) == (4, 6, 3, 2)
    assert (state.granted, state.succeeded, state.failed, state.quota_exhausted) == (6, 1, 2, 1)
    assert state.overloads["timeout"] == 1 and state.decreases == 1 and not state.slow_start
    assert state.latency_p50_s == 2.0 and state.latency_baseline_s == 2.0
    as_dict = limiter.status()[APP]
    assert as_dict["limit"] == 4 and as_dict["queued"] == 3 and as_dict["overloads"] == dict(state.overloads)
    await holders.finish()
    state = snap(limiter)
    assert (state.in_flight, state.queued, state.granted, state.succeeded) == (0, 0, 9, 7)


def test_app_keys_never_show_the_api_key() -> None:
    key = dify_app_key("https://api.dify.ai/v1", "app-SECRETSECRET")
    assert key.startswith("api.dify.ai#") and "SECRET" not in key
    assert key == dify_app_key("https://api.dify.ai/v1/", "app-SECRETSECRET")
    assert key != dify_app_key("https://api.dify.ai/v1", "app-OTHER")


# --- retry policy -----------------------------------------------------------------------------------

TOO_MANY = ChatEngineError("too_many_requests", "Too many requests.", status=429, retryable=True)


def policy(clock: VirtualClock, rng: float = 0.5, **settings: Any) -> RetryPolicy:
    return RetryPolicy(clock=clock, settings=replace(RetrySettings(), **settings), rng=lambda: rng)


def test_backoff_grows_exponentially_with_jitter() -> None:
    clock = VirtualClock()
    retry = policy(clock, max_attempts=5, base_delay_s=1.0, max_delay_s=20.0)
    deadline = clock.now() + 120
    delays = [retry.decide(TOO_MANY, attempt=a, deadline=deadline).delay_s for a in (1, 2, 3, 4)]
    assert delays == [0.75, 1.5, 3.0, 6.0]  # ceiling 1, 2, 4, 8; "equal jitter" at 0.5 gives 3/4 of it
    low = policy(clock, rng=0.0).decide(TOO_MANY, attempt=1, deadline=deadline)
    high = policy(clock, rng=1.0).decide(TOO_MANY, attempt=1, deadline=deadline)
    assert (low.retry, low.delay_s, high.delay_s) == (True, 0.5, 1.0)
    capped = policy(clock, max_attempts=20, max_delay_s=5.0).decide(TOO_MANY, attempt=10, deadline=deadline)
    assert capped.delay_s == 3.75


def test_attempts_are_bounded() -> None:
    clock = VirtualClock()
    retry = policy(clock, max_attempts=3)
    assert retry.decide(TOO_MANY, attempt=2, deadline=clock.now() + 60).retry
    last = retry.decide(TOO_MANY, attempt=3, deadline=clock.now() + 60)
    assert (last.retry, last.reason) == (False, "attempts used up")


def test_retry_after_in_seconds_or_as_a_date_is_honoured() -> None:
    clock = VirtualClock()
    retry = policy(clock, rng=0.0)
    deadline = clock.now() + 120
    assert retry.decide(TOO_MANY, attempt=1, deadline=deadline, retry_after="7").delay_s == 7.0
    assert retry.decide(TOO_MANY, attempt=1, deadline=deadline, retry_after=3).delay_s == 3.0
    date = format_datetime(datetime.fromtimestamp(clock.now() + 10, UTC), usegmt=True)
    decision = retry.decide(TOO_MANY, attempt=1, deadline=deadline, retry_after=date)
    assert (decision.retry, decision.delay_s, decision.reason) == (True, 10.0, "Retry-After")
    jittered = policy(clock, rng=1.0).decide(TOO_MANY, attempt=1, deadline=deadline, retry_after="10")
    assert jittered.delay_s == 11.0  # at most 10 % later, never earlier
    # Garbage is ignored: plain backoff.
    assert retry.decide(TOO_MANY, attempt=1, deadline=deadline, retry_after="soon").delay_s == 0.5


def test_parse_retry_after() -> None:
    now = START
    assert parse_retry_after(None, now=now) is None
    assert parse_retry_after("", now=now) is None
    assert parse_retry_after(" 5 ", now=now) == 5.0
    assert parse_retry_after("1.5", now=now) == 1.5
    assert parse_retry_after("-3", now=now) == 0.0
    assert parse_retry_after("inf", now=now) is None
    assert parse_retry_after("nan", now=now) is None
    assert parse_retry_after(float("inf"), now=now) is None
    past = format_datetime(datetime.fromtimestamp(now - 100, UTC), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00", now=now) is None  # no zone: not an HTTP date
    assert parse_retry_after("Wed, 99 Foo 2015 99:99:99 GMT", now=now) is None


def test_retries_fit_the_deadline() -> None:
    clock = VirtualClock()
    retry = policy(clock, rng=1.0, min_attempt_s=2.0, max_attempts=5)
    # 3 s left, an attempt needs 2: the 4 s backoff shrinks to 1 s.
    squeezed = retry.decide(TOO_MANY, attempt=3, deadline=clock.now() + 3)
    assert (squeezed.retry, squeezed.delay_s) == (True, 1.0)
    assert not retry.decide(TOO_MANY, attempt=1, deadline=clock.now() + 1.5).retry
    assert not retry.decide(TOO_MANY, attempt=1, deadline=clock.now() - 1).retry
    # A server that asks for more than the time left is not waited for.
    too_late = retry.decide(TOO_MANY, attempt=1, deadline=clock.now() + 10, retry_after="30")
    assert (too_late.retry, too_late.reason) == (False, "Retry-After 30 s does not fit")
    assert not retry.decide(TOO_MANY, attempt=1, deadline=clock.now() + 600, retry_after="120").retry


@pytest.mark.parametrize(
    "error",
    [
        ChatEngineError("timeout", "ReadTimeout", retryable=True),
        ChatEngineError("idle_timeout", "only pings", retryable=True),
        ChatEngineError("invalid_param", "query is required", status=400),
        ChatEngineError("unreachable", "UnsupportedProtocol", retryable=False),
    ],
)
def test_errors_that_are_not_retried(error: ChatEngineError) -> None:
    clock = VirtualClock()
    decision = policy(clock).decide(error, attempt=1, deadline=clock.now() + 120)
    assert not decision.retry and not decision.quota_exhausted


@pytest.mark.parametrize(
    "error",
    [
        ChatEngineError("http_503", "HTTP 503", status=503, retryable=True),
        ChatEngineError("unreachable", "ConnectError", retryable=True),
        ChatEngineError("internal_server_error", "boom", status=500, retryable=True),
        ChatEngineError("rate_limit_error", "Rate limit reached on requests per min (RPM)", status=429),
    ],
)
def test_momentary_failures_are_retried(error: ChatEngineError) -> None:
    clock = VirtualClock()
    decision = policy(clock).decide(error, attempt=1, deadline=clock.now() + 120)
    assert decision.retry and decision.delay_s > 0 and not decision.quota_exhausted


def test_an_exhausted_quota_is_reported_once_and_not_asked_again_for_a_while() -> None:
    clock = VirtualClock()
    retry = policy(clock, quota_cooldown_s=300)
    quota = ChatEngineError("rate_limit_error", "Rate Limit Error", status=429)
    deadline = clock.now() + 120
    assert not retry.quota_blocked("app-a")
    first = retry.decide(quota, attempt=1, deadline=deadline, app_key="app-a")
    assert (first.retry, first.quota_exhausted, first.report_quota) == (False, True, True)
    assert retry.quota_blocked("app-a") and not retry.quota_blocked("app-b")
    again = retry.decide(
        ChatEngineError("provider_quota_exceeded", "exhausted", status=400),
        attempt=1,
        deadline=deadline,
        app_key="app-a",
    )
    assert (again.retry, again.quota_exhausted, again.report_quota) == (False, True, False)
    clock.advance(299)
    assert retry.quota_blocked("app-a")
    clock.advance(2)
    assert not retry.quota_blocked("app-a")
    later = retry.decide(quota, attempt=1, deadline=clock.now() + 120, app_key="app-a")
    assert later.report_quota  # a new episode is reported again


def test_a_quota_retry_after_longer_than_the_cooldown_is_honoured() -> None:
    clock = VirtualClock()
    retry = policy(clock, quota_cooldown_s=60)
    quota = ChatEngineError("rate_limit_error", "Rate Limit Error", status=429)
    retry.decide(quota, attempt=1, deadline=clock.now() + 120, retry_after="3600", app_key="a")
    clock.advance(3599)
    assert retry.quota_blocked("a")
    clock.advance(1)
    assert not retry.quota_blocked("a")


# --- simulations ------------------------------------------------------------------------------------


class CappedApp:
    """A Dify app that takes `capacity` requests at once and answers 429 above it."""

    def __init__(self, clock: VirtualClock, *, capacity: int, accept_s: float, answer_s: float) -> None:
        self.clock = clock
        self.capacity = capacity
        self.accept_s = accept_s
        self.answer_s = answer_s
        self.active = 0
        self.peak = 0
        self.rejected = 0
        self.answered = 0
        self.all_busy_at: float | None = None

    async def ask(self, slot: Slot, *, busy_mark: int = 0) -> None:
        await self.clock.sleep(self.accept_s)  # the request travels to the app
        if self.active >= self.capacity:
            self.rejected += 1
            raise ChatEngineError(
                "too_many_requests",
                f"Too many requests. The current maximum concurrent requests allowed is {self.capacity}.",
                status=429,
                retryable=True,
            )
        self.active += 1
        self.peak = max(self.peak, self.active)
        if busy_mark and self.active >= busy_mark and self.all_busy_at is None:
            self.all_busy_at = self.clock.now()
        slot.accepted()
        try:
            await self.clock.sleep(self.answer_s)
        finally:
            self.active -= 1
        self.answered += 1


async def simulate(
    clock: VirtualClock,
    limiter: AdaptiveLimiter,
    app: CappedApp,
    customers: int,
    *,
    on_step: Callable[[], None],
) -> list[int]:
    retry = RetryPolicy(clock=clock, settings=RetrySettings(max_attempts=50), rng=random.Random(7).random)
    attempts: list[int] = []

    async def customer(i: int) -> None:
        deadline = clock.now() + 300
        attempt = 0
        while True:
            attempt += 1
            try:
                async with limiter.slot(APP, f"wm{i}") as slot:
                    await app.ask(slot, busy_mark=customers)
            except ChatEngineError as exc:
                decision = retry.decide(exc, attempt=attempt, deadline=deadline, app_key=APP)
                assert decision.retry, decision.reason
                await clock.sleep(decision.delay_s)
                continue
            attempts.append(attempt)
            return

    tasks = [asyncio.create_task(customer(i)) for i in range(customers)]

    def quiet() -> bool:
        done = sum(1 for t in tasks if t.done())
        state = limiter.snapshot().get(APP)
        return done + (state.queued if state else 0) + clock.sleepers == customers

    while not all(t.done() for t in tasks):
        await until(quiet)
        if all(t.done() for t in tasks):
            break
        on_step()
        clock.fire_next()
    await asyncio.gather(*tasks)
    return attempts


async def test_simulation_an_app_with_capacity_40_is_used_without_hammering_it() -> None:
    clock = VirtualClock()
    limiter = AdaptiveLimiter(
        clock=clock, settings=LimiterSettings(max_limit=1000, min_limit=4, initial_limit=16)
    )
    app = CappedApp(clock, capacity=40, accept_s=0.05, answer_s=2.0)
    limits: list[int] = []
    attempts = await simulate(clock, limiter, app, 300, on_step=lambda: limits.append(snap(limiter).limit))

    assert len(attempts) == 300 and app.answered == 300
    assert app.rejected < 0.15 * 300
    assert app.peak == 40  # the app was used to its capacity
    later = limits[len(limits) // 2 :]
    assert all(20 <= limit <= 60 for limit in later), later
    assert 28 <= snap(limiter).limit <= 45
    state = snap(limiter)
    assert (state.in_flight, state.queued, state.succeeded) == (0, 0, 300)
    assert state.overloads["rate_limited"] == app.rejected
    assert state.decreases <= 1 + app.rejected // 5


async def test_simulation_a_burst_of_1000_reaches_1000_in_flight_within_a_second() -> None:
    clock = VirtualClock()
    limiter = AdaptiveLimiter(
        clock=clock, settings=LimiterSettings(max_limit=1000, min_limit=4, initial_limit=16)
    )
    app = CappedApp(clock, capacity=10_000, accept_s=0.05, answer_s=2.0)
    attempts = await simulate(clock, limiter, app, 1000, on_step=lambda: None)

    assert len(attempts) == 1000 and app.rejected == 0 and app.peak == 1000
    assert app.all_busy_at is not None and app.all_busy_at - START <= 1.0
    assert snap(limiter).limit == 1000


async def test_has_room_until_a_new_call_would_wait_and_again_once_one_ends() -> None:
    limiter = AdaptiveLimiter(
        clock=VirtualClock(), settings=LimiterSettings(max_limit=4, min_limit=2, initial_limit=2)
    )
    assert limiter.has_room()  # nothing asked yet

    first = await limiter.acquire("app", "wm-a")
    assert limiter.has_room()
    second = await limiter.acquire("app", "wm-b")
    assert not limiter.has_room()  # both slots taken: a third call would queue

    limiter.release(first)
    assert limiter.has_room()
    limiter.release(second)


async def test_room_is_the_initial_limit_before_any_call_then_the_largest_current_limit() -> None:
    limiter = AdaptiveLimiter(
        clock=VirtualClock(), settings=LimiterSettings(max_limit=100, min_limit=2, initial_limit=8)
    )
    # A burst's first page: work sharing takes 32 customers, not all of them; 8 ask, 24 wait their turn (the
    # limit is used, so slow start may double it).
    assert limiter.room() == 8 * SLOW_START_ROOM

    held = [await limiter.acquire("big", f"wm-{n}") for n in range(8)]
    held[-1].accepted()  # taken with 8 in flight: slow start lets the app try 16
    assert limiter.room() == 16 * SLOW_START_ROOM
    small = await limiter.acquire("small", "wm-x")
    small.overload(
        Overload.RATE_LIMITED
    )  # the other app shrinks to its floor; the busiest app's limit counts
    assert limiter.limit("small") == 2
    assert limiter.room() == 16 * SLOW_START_ROOM
    more = await limiter.acquire("big", "wm-9")
    more.overload(Overload.RATE_LIMITED)  # out of slow start: the limit itself, no more
    assert limiter.room() == limiter.limit("big") == 8
    for slot in (*held, small, more):
        limiter.release(slot)
