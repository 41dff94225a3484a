"""Fair use: a sliding window per customer, one notice per window, refused messages not counted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from domain.rate_limit import RateDecision, RateLimit, RateWindow, admit

RULE = RateLimit(limit=3, window_s=60)


def run(times: list[float], rule: RateLimit = RULE) -> list[RateDecision]:
    window = RateWindow()
    decisions = []
    for now in times:
        decision, window = admit(window, now=now, rule=rule)
        decisions.append(decision)
    return decisions


def test_under_the_limit_everything_is_allowed() -> None:
    assert run([0, 1, 2]) == [RateDecision.ALLOW] * 3


def test_over_the_limit_one_notice_then_silence() -> None:
    assert run([0, 1, 2, 3, 4, 5]) == [RateDecision.ALLOW] * 3 + [
        RateDecision.NOTIFY,
        RateDecision.DROP,
        RateDecision.DROP,
    ]


def test_the_window_slides() -> None:
    decisions = run([0, 1, 2, 3, 60, 61, 62])
    assert decisions[3] is RateDecision.NOTIFY
    assert decisions[4:6] == [RateDecision.ALLOW, RateDecision.ALLOW]  # 0 and 1 slid out
    assert decisions[6] is RateDecision.ALLOW  # 2 slid out too


def test_another_notice_only_in_a_later_window() -> None:
    # Allowed at 0,1,2; notice at 3; 50 is still inside the notice's window; 63 would be allowed (the
    # first stamps slid out), so keep the window full with fresh traffic to see the second notice.
    decisions = run([0, 1, 2, 3, 50, 61, 62, 63, 64, 125])
    assert decisions[:5] == [RateDecision.ALLOW] * 3 + [RateDecision.NOTIFY, RateDecision.DROP]
    assert decisions[5:8] == [RateDecision.ALLOW] * 3
    assert decisions[8] is RateDecision.NOTIFY  # 63 ≥ 3 + 60: a new window, a new notice
    assert decisions[9] is RateDecision.ALLOW


def test_a_limit_of_zero_is_off() -> None:
    assert run([0] * 100, RateLimit(0, 60)) == [RateDecision.ALLOW] * 100
    assert not RateLimit(0, 60).enabled and not RateLimit(5, 0).enabled


def test_idle_windows_can_be_forgotten() -> None:
    _, window = admit(RateWindow(), now=0, rule=RULE)
    assert not window.is_idle(now=30, window_s=60)
    assert window.is_idle(now=60, window_s=60)


def in_window(stamps: list[float], now: float, window_s: float) -> int:
    """How many stamps the window ending at `now` holds (the rule's own arithmetic: now - s < window)."""
    return sum(1 for s in stamps if s <= now and now - s < window_s)


@given(
    st.lists(st.floats(min_value=0, max_value=600, allow_nan=False), max_size=80).map(sorted),
    st.integers(min_value=1, max_value=6),
    st.floats(min_value=1, max_value=120),
)
def test_never_more_than_the_limit_and_one_notice_per_window(
    times: list[float], limit: int, window_s: float
) -> None:
    rule = RateLimit(limit, window_s)
    decisions = run(times, rule)
    allowed = [t for t, d in zip(times, decisions, strict=True) if d is RateDecision.ALLOW]
    notices = [t for t, d in zip(times, decisions, strict=True) if d is RateDecision.NOTIFY]
    for t in times:
        assert in_window(allowed, t, window_s) <= limit
    for earlier, later in zip(notices, notices[1:], strict=False):
        assert later - earlier >= window_s
    # Nobody is refused while under the limit.
    for t, d in zip(times, decisions, strict=True):
        if d is not RateDecision.ALLOW:
            assert in_window(allowed, t, window_s) == limit
