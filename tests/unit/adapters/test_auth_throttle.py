"""Failed admin attempts: lockouts per address, growing and capped, in bounded memory."""

from __future__ import annotations

import pytest

from adapters.inbound.auth_throttle import FailedAuthThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def throttle(clock: Clock, **kwargs: float) -> FailedAuthThrottle:
    settings = {"threshold": 5, "window_s": 60.0, "base_lockout_s": 30.0, "max_lockout_s": 900.0, **kwargs}
    return FailedAuthThrottle(clock=clock, **settings)  # type: ignore[arg-type]


def test_the_fifth_failure_within_the_window_locks_the_address(clock: Clock) -> None:
    t = throttle(clock)
    assert [t.failed("a") for _ in range(4)] == [0, 0, 0, 0]
    assert t.retry_after("a") == 0
    assert t.failed("a") == 30
    assert t.retry_after("a") == 30 and t.retry_after("b") == 0
    clock.now += 29.5
    assert t.retry_after("a") == 1
    clock.now += 0.5
    assert t.retry_after("a") == 0


def test_failures_spread_wider_than_the_window_do_not_lock(clock: Clock) -> None:
    t = throttle(clock)
    for _ in range(20):
        assert t.failed("a") == 0
        clock.now += 15.0  # four per minute


def test_lockouts_double_after_each_further_failure_up_to_the_cap(clock: Clock) -> None:
    t = throttle(clock)
    for _ in range(4):
        t.failed("a")
    lockouts = []
    for _ in range(8):
        lockouts.append(t.failed("a"))
        clock.now += lockouts[-1]
    assert lockouts == [30, 60, 120, 240, 480, 900, 900, 900]


def test_a_success_clears_only_that_address(clock: Clock) -> None:
    t = throttle(clock)
    for _ in range(5):
        t.failed("a")
        t.failed("b")
    clock.now += 30
    t.succeeded("a")
    assert t.failed("a") == 0  # a fresh start
    assert t.failed("b") == 60  # still on its second strike


def test_strikes_are_forgotten_after_a_clean_hour(clock: Clock) -> None:
    t = throttle(clock)
    for _ in range(5):
        t.failed("a")
    clock.now += 3601
    assert t.failed("a") == 0


def test_memory_is_bounded_by_the_number_of_addresses(clock: Clock) -> None:
    t = FailedAuthThrottle(max_addresses=100, clock=clock)
    for i in range(10_000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    for _ in range(4):
        t.failed("attacker")
    assert t.failed("attacker") > 0  # the most recent addresses are the ones kept


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        FailedAuthThrottle(threshold=0)
    with pytest.raises(ValueError):
        FailedAuthThrottle(base_lockout_s=60, max_lockout_s=30)
