"""Turns on the event loop for CPU-heavy steps, so that a burst of answers does not delay acknowledgements.

The service is one event loop. When hundreds of Dify answers arrive within the same moment, each
answer's rendering and sending is a millisecond or so of CPU, and every task ready at the start of a loop
iteration runs in that iteration: the iteration grows to hundreds of milliseconds, and a WeCom callback that
arrives meanwhile is acknowledged only after it (bench/FINDINGS.md, issue #14). `LoopTurns.take()` lets at
most `per_iteration` callers through per loop iteration; the others wait, first come first served, for the
following iterations.
Nothing is dropped or reordered within a customer (each customer's messages are answered one after the other
by their drain); the cost is a loop iteration of delay for an answer, and only while answers crowd the loop.
"""

from __future__ import annotations

import asyncio
from collections import deque

# Answers rendered and handed to the sender per loop iteration. ~1 ms of CPU each: an iteration stays around
# 16 ms of answer work, and 16 per iteration still passes well over a thousand answers a second.
ANSWERS_PER_ITERATION = 16


class LoopTurns:
    def __init__(self, per_iteration: int = ANSWERS_PER_ITERATION) -> None:
        self._per_iteration = max(per_iteration, 1)
        self._used = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._reset_scheduled = False

    async def take(self) -> None:
        """Return at once while this iteration has turns left (and nobody waits); else wait for a turn."""
        loop = asyncio.get_running_loop()
        if self._used < self._per_iteration and not self._waiting:
            self._used += 1
            self._schedule_reset(loop)
            return
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        self._schedule_reset(loop)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._next_iteration(loop)  # the turn we were given is unused: the next one waiting gets it
            raise

    def _schedule_reset(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._reset_scheduled:
            self._reset_scheduled = True
            loop.call_soon(self._reset, loop)

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new loop iteration: hand this iteration's turns to those waiting, oldest first."""
        self._reset_scheduled = False
        self._used = 0
        self._next_iteration(loop)

    def _next_iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._waiting and self._used < self._per_iteration:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._used += 1
        if self._waiting or self._used:
            self._schedule_reset(loop)
