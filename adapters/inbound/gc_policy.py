"""When the service collects cyclic garbage: young objects as CPython does, the whole heap only when quiet.

Reference counting frees almost everything the service allocates; the cycle collector is for the rest. Its
young generations are cheap (they look only at objects allocated since), but a full collection walks every
tracked object, and a campaign burst holds a thousand customers' drains, streams and replies at once: on the
2-core benchmark a full collection took 50-160 ms and happened two or three times per 1,000-customer burst,
holding the interpreter for both event loops. That was the callback acknowledgement's p99 (110 ms) and
~0.3 s of the burst (bench/FINDINGS.md, issue #14).

So `GcPolicy` keeps CPython's young-generation thresholds, switches its automatic full collections off and
runs them itself, from a thread of its own that looks every `look_every_s` (0.25 s): a full collection runs
as soon as the service is quiet (no customer being answered) and anything reached the oldest generation
since the last one, so garbage left by a burst goes when the burst ends, and at the latest `max_wait_s`
(30 s) after the last one while the service never quiets down, so long-lived cyclic garbage stays bounded by
half a minute of traffic (a few MiB per thousand messages). An idle service is not collected again and
again: without young collections since the last full one there is nothing new to find. At start the
objects of the import and wiring are frozen (`gc.freeze()`): no collection ever walks them again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("kfdify.gc")

LOOK_EVERY_S: Final = 0.25
FULL_AT_LATEST_S: Final = 30.0
# A threshold for the oldest generation that is never reached: CPython's automatic full collections off.
_NEVER: Final = 1 << 30


def _promoted_since_last_full() -> bool:
    """Whether a young collection moved objects toward the oldest generation since the last full one."""
    return gc.get_count()[2] > 0


class GcPolicy:
    def __init__(
        self,
        quiet: Callable[[], bool],
        *,
        look_every_s: float = LOOK_EVERY_S,
        max_wait_s: float = FULL_AT_LATEST_S,
        collect: Callable[[], object] = gc.collect,
        clock: Callable[[], float] = time.monotonic,
        anything_new: Callable[[], bool] = _promoted_since_last_full,
    ) -> None:
        if look_every_s <= 0 or max_wait_s < look_every_s:
            raise ValueError("need 0 < look_every_s <= max_wait_s")
        self._quiet = quiet
        self._anything_new = anything_new
        self._every_s = look_every_s
        self._max_wait_s = max_wait_s
        self._collect = collect
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gc-policy", daemon=True)
        self._previous: tuple[int, int, int] | None = None
        self.full_collections = 0

    def start(self) -> GcPolicy:
        """Freeze what exists now, take over full collections, start the thread."""
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        self._previous = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and give CPython its automatic full collections back."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None

    def _run(self) -> None:
        last = self._clock()
        while not self._stop.wait(self._every_s):
            now = self._clock()
            overdue = now - last >= self._max_wait_s
            try:
                quiet = self._quiet()
            except Exception:  # a broken gauge must not stop collections
                quiet = True
            if not (quiet or overdue) or not self._anything_new():
                continue
            started = time.perf_counter()
            self._collect()
            self.full_collections += 1
            last = self._clock()
            log.debug(
                "full garbage collection in %.1f ms%s",
                (time.perf_counter() - started) * 1000,
                "" if quiet else " (overdue: the service has been busy)",
            )
