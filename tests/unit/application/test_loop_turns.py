"""LoopTurns: at most N callers per loop iteration, first come first served, none lost."""

from __future__ import annotations

import asyncio
import collections

import pytest

from application.loop_turns import LoopTurns

pytestmark = pytest.mark.anyio


class _Iterations:
    """Counts event loop iterations: a callback that re-schedules itself runs once per iteration."""

    def __init__(self) -> None:
        self.count = 0
        self._running = True

    def start(self) -> None:
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        if self._running:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False


async def test_lets_at_most_n_callers_through_per_iteration_in_order() -> None:
    turns = LoopTurns(per_iteration=3)
    iterations = _Iterations()
    iterations.start()
    passed: list[tuple[int, int]] = []

    async def caller(n: int) -> None:
        await turns.take()
        passed.append((n, iterations.count))

    await asyncio.gather(*(caller(n) for n in range(20)))
    iterations.stop()

    assert [n for n, _ in passed] == list(range(20))
    per_iteration = collections.Counter(at for _, at in passed)
    assert max(per_iteration.values()) == 3
    assert len(per_iteration) >= 7  # 20 callers, 3 per iteration


async def test_a_free_turn_is_taken_without_waiting() -> None:
    turns = LoopTurns(per_iteration=2)
    waited = asyncio.ensure_future(turns.take())
    assert not waited.done()
    await asyncio.sleep(0)
    assert waited.done()  # the first caller of an iteration went through at once


async def test_a_cancelled_waiter_does_not_hold_up_the_others() -> None:
    turns = LoopTurns(per_iteration=1)
    first = asyncio.ensure_future(turns.take())
    cancelled = asyncio.ensure_future(turns.take())
    after = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0)  # the first went through; the other two wait for later iterations
    assert first.done() and not cancelled.done() and not after.done()
    cancelled.cancel()
    await asyncio.wait_for(after, timeout=5)
    assert cancelled.cancelled()
