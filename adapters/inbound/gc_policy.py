"""When and where the service collects cyclic garbage: on the pipeline's loop, the whole heap only when quiet.

Reference counting frees almost everything the service allocates; the cycle collector is for the rest. Its
young generations are cheap (they look only at objects allocated since), but a full collection walks every
tracked object, and a campaign burst holds a thousand customers' drains, streams and replies at once: on the
2-core benchmark a full collection took 50-160 ms and happened two or three times per 1,000-customer burst,
holding the interpreter for both event loops. That was the callback acknowledgement's p99 (110 ms) and
~0.3 s of the burst (bench/FINDINGS.md, issue #14).

Where: CPython collects on whichever thread happens to allocate past a threshold, and a collection runs the
finalizers of what it frees there. The service has two event loops on two threads (pipeline_loop.py), and
some finalizers touch the loop their object belongs to (an aiohttp response never closed hands its
connection back to its pool, waking the pool's waiters): from the wrong thread that is a race on a loop that
is not thread-safe. So CPython's automatic collections are off, and `GcPolicy.run`, a task on the pipeline's
loop, does them all there, as CPython would count them: a young collection once `gc.get_count()` says as
many objects were allocated as CPython's own threshold allows (looked at every `tick_s`, 50 ms), the middle
generation every tenth one, or every hundredth while customers are being answered (it then holds their
drains and streams, still alive: such a collection freed little and took 60-70 ms in a burst).

When: a full collection runs as soon as no customer is being answered and young collections moved anything
on since the last full one (garbage left by a burst goes when the burst ends; an idle service is not
collected again and again), and at the latest `max_wait_s` (30 s) after the last one while the service never
quiets down, so long-lived cyclic garbage stays bounded by half a minute of traffic (a few MiB per thousand
messages). At start the objects of the import and wiring are frozen (`gc.freeze()`): no collection ever
walks them again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("kfdify.gc")

TICK_S: Final = 0.05
FULL_AT_LATEST_S: Final = 30.0
BUSY_MIDDLE_FACTOR: Final = 10


class GcPolicy:
    def __init__(
        self,
        quiet: Callable[[], bool],
        *,
        tick_s: float = TICK_S,
        max_wait_s: float = FULL_AT_LATEST_S,
        collect: Callable[[int], object] = gc.collect,
        counts: Callable[[], tuple[int, int, int]] = gc.get_count,
        thresholds: tuple[int, int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tick_s <= 0 or max_wait_s < tick_s:
            raise ValueError("need 0 < tick_s <= max_wait_s")
        self._quiet = quiet
        self._tick_s = tick_s
        self._max_wait_s = max_wait_s
        self._collect = collect
        self._counts = counts
        self._thresholds = thresholds or gc.get_threshold()
        self._clock = clock
        self._was_enabled: bool | None = None

    def take_over(self) -> GcPolicy:
        """Freeze what exists now and switch CPython's automatic collections off (call before `run`)."""
        gc.collect()
        gc.freeze()
        self._was_enabled = gc.isenabled()
        gc.disable()
        return self

    def give_back(self) -> None:
        """CPython's automatic collections again, as before `take_over`."""
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    async def run(self) -> None:
        """Collect as described in the module docstring, on the running loop, until cancelled."""
        last_full = self._clock()
        while True:
            await asyncio.sleep(self._tick_s)
            if self.step(last_full):
                last_full = self._clock()

    def _is_quiet(self) -> bool:
        try:
            return self._quiet()
        except Exception:  # a broken gauge must not stop collections
            return True

    def step(self, last_full: float) -> bool:
        """One look: a young (or middle) collection when due, then a full one when due. True when a full
        collection ran."""
        young, middle, _ = self._thresholds
        allocated, young_runs, _ = self._counts()
        if allocated >= young:
            runs = young_runs + 1
            # While customers are being answered the middle generation holds their drains and streams:
            # collecting it finds little and took 60-70 ms each time, so then it waits BUSY_MIDDLE_FACTOR
            # times longer (bench/FINDINGS.md, issue #14).
            due = runs >= middle and (runs >= middle * BUSY_MIDDLE_FACTOR or self._is_quiet())
            self._collect(1 if due else 0)
        if self._counts()[2] == 0:
            return False  # nothing moved to the oldest generation since the last full collection
        quiet = self._is_quiet()
        overdue = self._clock() - last_full >= self._max_wait_s
        if not (quiet or overdue):
            return False
        started = time.perf_counter()
        self._collect(2)
        log.debug(
            "full garbage collection in %.1f ms%s",
            (time.perf_counter() - started) * 1000,
            "" if quiet else " (overdue: the service has been busy)",
        )
        return True
