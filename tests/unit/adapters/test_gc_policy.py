"""Garbage collection on the pipeline's loop: young generations as CPython counts them, full collections
when no customer is being answered or when overdue, never by CPython's own thresholds."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from adapters.inbound.gc_policy import GcPolicy


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    gc.unfreeze()


class Heap:
    """gc.get_count() and gc.collect(generation) as CPython keeps them, for a policy under test."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.collected: list[int] = []

    def counts(self) -> tuple[int, int, int]:
        return self.count[0], self.count[1], self.count[2]

    def collect(self, generation: int) -> int:
        self.collected.append(generation)
        for younger in range(generation + 1):
            self.count[younger] = 0
        if generation < 2:
            self.count[generation + 1] += 1
        return 0


def policy(heap: Heap, *, quiet: bool = True, now: list[float] | None = None) -> GcPolicy:
    clock = now or [0.0]
    return GcPolicy(
        lambda: quiet,
        collect=heap.collect,
        counts=heap.counts,
        thresholds=(700, 10, 10),
        clock=lambda: clock[0],
        max_wait_s=30.0,
    )


def test_takes_over_automatic_collection_and_gives_it_back() -> None:
    gc.enable()
    taken = GcPolicy(lambda: True).take_over()
    assert not gc.isenabled()
    assert gc.get_freeze_count() > 0  # what existed at start is never walked again
    taken.give_back()
    assert gc.isenabled()


def allocate_and_step(heap: Heap, gcp: GcPolicy, rounds: int) -> None:
    for _ in range(rounds):
        heap.count[0] = 699
        gcp.step(last_full=0.0)  # not yet
        heap.count[0] = 700
        gcp.step(last_full=0.0)


def test_young_collections_as_cpython_counts_them_and_the_middle_one_every_tenth_when_quiet() -> None:
    heap = Heap()
    gcp = policy(heap, quiet=True)
    allocate_and_step(heap, gcp, 25)
    # Every tenth young collection is a middle one, and what it moves on is then fully collected (quiet).
    assert heap.collected == ([0] * 9 + [1, 2]) * 2 + [0] * 5


def test_while_busy_the_middle_generation_waits_ten_times_longer() -> None:
    heap = Heap()
    gcp = policy(heap, quiet=False)
    allocate_and_step(heap, gcp, 250)
    assert heap.collected.count(0) == 248 and heap.collected.count(1) == 2
    assert heap.collected.index(1) == 99
    assert 2 not in heap.collected  # busy and not overdue: no full collection


def test_a_full_collection_once_quiet_if_anything_moved_on() -> None:
    heap = Heap()
    gcp = policy(heap, quiet=True)
    assert not gcp.step(last_full=0.0)  # nothing reached the oldest generation: nothing to do
    heap.count[2] = 1
    assert gcp.step(last_full=0.0)
    assert heap.collected == [2]
    assert not gcp.step(last_full=0.0)  # collected: an idle service is not collected again and again


def test_a_busy_service_is_fully_collected_only_when_overdue() -> None:
    heap, now = Heap(), [0.0]
    gcp = policy(heap, quiet=False, now=now)
    heap.count[2] = 3
    now[0] = 29.9
    assert not gcp.step(last_full=0.0)
    now[0] = 30.0
    assert gcp.step(last_full=0.0)
    assert heap.collected == [2]


def test_a_broken_gauge_counts_as_quiet() -> None:
    def broken() -> bool:
        raise RuntimeError("gauge")

    heap = Heap()
    heap.count[2] = 1
    gcp = GcPolicy(broken, collect=heap.collect, counts=heap.counts, thresholds=(700, 10, 10))
    assert gcp.step(last_full=0.0)


@pytest.mark.anyio
async def test_run_collects_on_the_loop_it_runs_on() -> None:
    heap = Heap()
    heap.count[2] = 1
    done = asyncio.Event()

    def collect(generation: int) -> int:
        heap.collect(generation)
        done.set()
        return 0

    gcp = GcPolicy(lambda: True, tick_s=0.001, collect=collect, counts=heap.counts, thresholds=(700, 10, 10))
    task = asyncio.create_task(gcp.run())
    await asyncio.wait_for(done.wait(), 10)
    task.cancel()
    assert heap.collected == [2]


def test_rejects_nonsense_intervals() -> None:
    with pytest.raises(ValueError):
        GcPolicy(lambda: True, tick_s=0)
    with pytest.raises(ValueError):
        GcPolicy(lambda: True, tick_s=10, max_wait_s=5)
