"""Start and stop the service's background work; refuse new callbacks while stopping."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from application.dispatcher import Dispatcher

log = logging.getLogger("kfdify.lifecycle")


class Lifecycle:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        grace_s: float,
        closers: Sequence[Callable[[], Awaitable[object]]] = (),
        start_notes: Sequence[tuple[int, str]] = (),
    ) -> None:
        self._dispatcher = dispatcher
        self._grace_s = grace_s
        self._closers = closers
        self._notes = start_notes
        self.accepting = False

    async def start(self) -> None:
        for level, note in self._notes:
            log.log(level, note)
        await self._dispatcher.start()
        self.accepting = True
        log.info("service started")

    async def stop(self) -> None:
        self.accepting = False
        log.info("stopping: finishing replies in flight (grace %.0f s)", self._grace_s)
        cancelled = await self._dispatcher.stop(self._grace_s)
        if cancelled:
            log.warning(
                "%d task(s) did not finish in time; their messages stay recorded for later", cancelled
            )
        for close in self._closers:
            try:
                await close()
            except Exception:
                log.exception("closing a client failed")
        log.info("stopped")
