"""Full garbage collections run when the service is quiet, or when overdue; never by CPython's thresholds."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from adapters.inbound.gc_policy import GcPolicy


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


class Collections:
    def __init__(self, wanted: int) -> None:
        self.count = 0
        self.wanted = wanted
        self.done = threading.Event()

    def __call__(self) -> int:
        self.count += 1
        if self.count >= self.wanted:
            self.done.set()
        return 0


def test_takes_over_full_collections_and_gives_them_back() -> None:
    young, middle, oldest = gc.get_threshold()
    policy = GcPolicy(lambda: False, look_every_s=3600, max_wait_s=3600).start()
    try:
        assert gc.get_threshold()[:2] == (young, middle)  # young generations as CPython does them
        assert gc.get_threshold()[2] > 1_000_000  # automatic full collections off
        assert gc.get_freeze_count() > 0  # what existed at start is never walked again
    finally:
        policy.stop()
    assert gc.get_threshold() == (young, middle, oldest)


def test_collects_while_quiet_when_young_collections_moved_anything_on() -> None:
    collections = Collections(wanted=3)
    policy = GcPolicy(
        lambda: True, look_every_s=0.001, max_wait_s=3600, collect=collections, anything_new=lambda: True
    ).start()
    try:
        assert collections.done.wait(10)
    finally:
        policy.stop()


def test_an_idle_service_with_nothing_new_is_not_collected_again_and_again() -> None:
    looks = threading.Semaphore(0)
    collections = Collections(wanted=1)

    def nothing_new() -> bool:
        looks.release()
        return False

    policy = GcPolicy(
        lambda: True, look_every_s=0.001, max_wait_s=3600, collect=collections, anything_new=nothing_new
    ).start()
    try:
        for _ in range(5):
            assert looks.acquire(timeout=10)
        assert collections.count == 0
    finally:
        policy.stop()


def test_a_busy_service_is_collected_only_when_overdue() -> None:
    """While busy, no collection until max_wait_s of the (controlled) clock has passed since the last."""
    now = [0.0]
    looks = threading.Semaphore(0)
    collections = Collections(wanted=1)

    def busy() -> bool:
        looks.release()
        return False

    policy = GcPolicy(
        busy,
        look_every_s=0.001,
        max_wait_s=100.0,
        collect=collections,
        clock=lambda: now[0],
        anything_new=lambda: True,
    ).start()
    try:
        for _ in range(5):  # the policy looked five times, busy and not overdue: nothing collected
            assert looks.acquire(timeout=10)
        assert collections.count == 0
        now[0] = 100.0
        assert collections.done.wait(10)
    finally:
        policy.stop()


def test_a_broken_gauge_counts_as_quiet() -> None:
    def broken() -> bool:
        raise RuntimeError("gauge")

    collections = Collections(wanted=1)
    policy = GcPolicy(
        broken, look_every_s=0.001, max_wait_s=3600, collect=collections, anything_new=lambda: True
    ).start()
    try:
        assert collections.done.wait(10)
    finally:
        policy.stop()


def test_rejects_nonsense_intervals() -> None:
    with pytest.raises(ValueError):
        GcPolicy(lambda: True, look_every_s=0)
    with pytest.raises(ValueError):
        GcPolicy(lambda: True, look_every_s=10, max_wait_s=5)


def test_the_default_signal_sees_promotions_to_the_oldest_generation() -> None:
    from adapters.inbound.gc_policy import _promoted_since_last_full

    gc.collect()
    assert not _promoted_since_last_full()
    gc.collect(1)  # a middle-generation collection moves survivors on
    assert _promoted_since_last_full()
