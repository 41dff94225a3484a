"""Background work: coalesced pulls per kf account, one ordered drain per customer, recovery, shutdown.

A callback only calls `notify()`, which never waits: the webhook acknowledges WeCom in milliseconds.

Pull coordination across instances (store-side counter + lease):
- whoever is notified first bumps the kf account's request counter, then tries to take the pull lease;
- the lease holder reads the counter before pulling and again after releasing the lease, and pulls again
  when it changed. Either the holder sees a request made meanwhile, or the requester's lease attempt comes
  after the release and succeeds: a callback never goes unanswered, and pulls never pile up.

Sharing the work (application/work_sharing.py): whoever pulled, every instance answers what waits in the
shared inbox. Each instance starts drains only while it has room (`max_drains`, and the answering side's
`capacity`), scans the kf account's pending customers after its pulls, when a callback arrives while another
instance pulls, and as its drains finish while customers are left; one scan loop per kf account at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine
from typing import Any, Protocol

from application.drain_customer import DrainCustomer, DrainOutcome
from application.errors import WeComError
from application.options import BotOptions
from application.ports import Inbox, KfRegistry, PullCoordination
from application.pull_messages import PullMessages
from application.telemetry import Telemetry, correlation_id
from application.work_sharing import (
    SCAN_INTERVAL_S,
    SCAN_LINGER_S,
    BusyElsewhere,
    Capacity,
    DrainRoom,
    OtherInstances,
)
from domain.messages import CallbackNotice, CustomerRef

log = logging.getLogger("kfdify.dispatch")


class DispatchStore(KfRegistry, PullCoordination, Inbox, Protocol):
    """What the dispatcher needs of the state store: the kf accounts, the pull lease, who has messages."""


def _running(task: asyncio.Task[None] | None) -> bool:
    """A task whose coroutine has returned is done at once, but forgotten only by a later callback: a
    request in between must start a new task, not wait for one that will never look again."""
    return task is not None and not task.done()


class Dispatcher:
    def __init__(
        self,
        *,
        store: DispatchStore,
        pull: PullMessages,
        drain: DrainCustomer,
        options: BotOptions,
        telemetry: Telemetry,
        owner: str,
        max_drains: int = 0,
        capacity: Capacity | None = None,
    ) -> None:
        """`max_drains`: customers drained at once by this instance (0: no limit, the single-instance
        default); `capacity`: whether the answering side has room now (None: always)."""
        self._store = store
        self._pull = pull
        self._drain = drain
        self._options = options
        self._telemetry = telemetry
        self._owner = owner
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._pull_again: set[str] = set()
        self._tokens: dict[str, str] = {}
        # When the latest pull of each kf account started (loop time): paces pulls across pull loops too.
        self._pull_started: dict[str, float] = {}
        self._drains: dict[CustomerRef, asyncio.Task[None]] = {}
        self._drain_again: set[CustomerRef] = set()
        self._room = DrainRoom(max_drains=max_drains, capacity=capacity)
        self._room_freed = asyncio.Event()
        self._elsewhere = BusyElsewhere()
        self._scans: dict[str, asyncio.Task[None]] = {}
        self._pulled_here: set[str] = set()  # kf accounts whose latest pull this instance made
        self._others = OtherInstances()
        self._scan_again: set[str] = set()
        self._recovery: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # --- entry points -------------------------------------------------------------------------------------

    def notify(self, open_kfid: str, token: str = "") -> None:
        """New data waits at WeCom for this kf account. Returns at once."""
        if self._closing or not open_kfid:
            return
        if token:
            self._tokens[open_kfid] = token
        if _running(self._pulls.get(open_kfid)):
            self._pull_again.add(open_kfid)
            self._telemetry.count("pulls_coalesced")
            return
        self._pulls[open_kfid] = self._spawn(self._pull_loop(open_kfid), self._pulls, open_kfid)

    def on_notice(self, notice: CallbackNotice) -> None:
        """A `kf_msg_or_event` callback. Older payloads lack OpenKfId: then every known account is pulled."""
        if notice.open_kfid:
            self.notify(notice.open_kfid, notice.token)
        elif not self._closing:
            self._spawn(self._notify_known(notice.token))

    async def _notify_known(self, token: str) -> None:
        for open_kfid in await self._store.known_kfs():
            self.notify(open_kfid, token)

    def drain(self, customer: CustomerRef) -> None:
        if self._closing:
            return
        if _running(self._drains.get(customer)):
            self._drain_again.add(customer)
            return
        self._drains[customer] = self._spawn(self._drain_loop(customer), self._drains, customer)

    def scan(self, open_kfid: str) -> None:
        """Look for customers of `open_kfid` waiting in the shared inbox and take those this instance has
        room for. Coalesced: one scan loop per kf account; a request meanwhile makes it look once more."""
        if self._closing or not open_kfid:
            return
        if _running(self._scans.get(open_kfid)):
            self._scan_again.add(open_kfid)
            return
        self._scans[open_kfid] = self._spawn(self._scan_loop(open_kfid), self._scans, open_kfid)

    def _offer(self, customer: CustomerRef) -> bool:
        """Start draining `customer` if this instance has room; False when it was left for later (or for
        another instance)."""
        if _running(self._drains.get(customer)):
            self.drain(customer)  # it may be about to find the inbox empty: make it look once more
            return True
        if not self._room.has_room(len(self._drains)):
            return False
        self.drain(customer)
        return True

    async def start(self) -> None:
        self._recovery = asyncio.create_task(self._recovery_loop())

    async def stop(self, grace_s: float) -> int:
        """Stop taking work; give replies in flight `grace_s` to finish; hand back the rest. Returns how many
        tasks had to be cancelled."""
        self._closing = True
        if self._recovery is not None:
            self._recovery.cancel()
        tasks = [*self._pulls.values(), *self._drains.values(), *self._scans.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
        else:
            pending = set()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self._recovery is not None:
            await asyncio.gather(self._recovery, return_exceptions=True)
        return len(pending)

    @property
    def busy(self) -> bool:
        return bool(self._pulls or self._drains or self._scans)

    @property
    def draining(self) -> int:
        """Customers this instance drains now."""
        return len(self._drains)

    async def idle(self) -> None:
        """Wait until no pull, scan or drain runs (tests and benchmarks)."""
        while self._pulls or self._drains or self._scans:
            await asyncio.wait([*self._pulls.values(), *self._drains.values(), *self._scans.values()])
            await asyncio.sleep(0)  # let the done callbacks forget the finished tasks

    # --- loops --------------------------------------------------------------------------------------------

    def _spawn(
        self,
        coro: Coroutine[Any, Any, None],
        registry: dict[Any, asyncio.Task[None]] | None = None,
        key: object = None,
    ) -> asyncio.Task[None]:
        """Start `coro`; when it ends, forget it in `registry[key]` unless a newer task took that place."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if registry is not None and registry.get(key) is finished:
                del registry[key]
                if registry is self._drains:
                    self._room_freed.set()

        task.add_done_callback(done)
        return task

    async def _pull_loop(self, open_kfid: str) -> None:
        loop = asyncio.get_running_loop()
        # A callback right after a pull (the previous loop had nothing more to do) waits for the interval
        # too: with a fast sync_msg, callbacks 2 ms apart would otherwise each start their own pull.
        last = self._pull_started.get(open_kfid)
        pause = 0.0 if last is None else max(self._options.pull_interval_s - (loop.time() - last), 0.0)
        while True:
            if pause:
                await asyncio.sleep(pause)
            self._pull_again.discard(open_kfid)
            token = self._tokens.pop(open_kfid, "")
            started = self._pull_started[open_kfid] = loop.time()
            try:
                again = await self._pull_once(open_kfid, token)
                # Back-to-back pulls (a flood of callbacks) start at least pull_interval_s apart: the next
                # pull then collects everything that arrived meanwhile, in one sync_msg.
                pause = max(self._options.pull_interval_s - (loop.time() - started), 0.0)
            except WeComError as exc:
                log.warning("pull failed kf=%s errcode=%s %s", open_kfid, exc.errcode, exc.errmsg)
                again = exc.is_transient
                pause = min(max(pause * 2, 1.0), 30.0) * (1 + random.random() / 2)
                await self._drain_recorded(open_kfid)
            except Exception:
                log.exception("pull failed kf=%s", open_kfid)
                again = False
                await self._drain_recorded(open_kfid)
            if self._closing or not (again or open_kfid in self._pull_again):
                return

    async def _pull_once(self, open_kfid: str, token: str) -> bool:
        """One coordinated pull. True when another pull is due at once."""
        await self._store.remember_kf(open_kfid)
        await self._store.request_pull(open_kfid, token)
        lease = self._options.pull_lease_s
        if not await self._store.acquire_pull(open_kfid, owner=self._owner, lease_s=lease) and (
            # Our own lease, left behind by a release that failed (say, Memcached blinked): still ours.
            not await self._store.renew_pull(open_kfid, owner=self._owner, lease_s=lease)
        ):
            self._telemetry.count("pulls_elsewhere")
            self._pulled_here.discard(open_kfid)
            self._others.seen(open_kfid, now=asyncio.get_running_loop().time())
            # The holder pulls; what it records, any instance may answer: look at what waits.
            self.scan(open_kfid)
            # The holder will see our request when it finishes. Only a local callback that came in while
            # we asked warrants another try, after a short pause.
            if open_kfid in self._pull_again:
                await asyncio.sleep(0.2)
                return True
            return False
        self._pulled_here.add(open_kfid)
        try:
            before, shared_token = await self._store.pull_requests(open_kfid)
            result = await self._pull(open_kfid, token=token or shared_token)
        finally:
            await self._store.release_pull(open_kfid, owner=self._owner)
        self._telemetry.count("pulls")
        after, _ = await self._store.pull_requests(open_kfid)
        now = asyncio.get_running_loop().time()
        if after != before:  # asked by another instance while this one pulled
            self._others.seen(open_kfid, now=now)
        share = self._others.share(open_kfid, len(result.customers), now=now)
        left = [c for i, c in enumerate(result.customers) if i >= share or not self._offer(c)]
        if left or self._room.limited:
            self.scan(open_kfid)  # the rest as room frees (or for another instance), and pages recorded since
        return after != before or open_kfid in self._pull_again

    async def _drain_recorded(self, open_kfid: str) -> None:
        """Pages recorded before a pull failed are answered now, not at the next recovery pass."""
        self.scan(open_kfid)

    async def _scan_loop(self, open_kfid: str) -> None:
        loop = asyncio.get_running_loop()
        linger_until = loop.time() + SCAN_LINGER_S
        while not self._closing:
            self._scan_again.discard(open_kfid)
            started = loop.time()
            if self._room.limited and not self._room.has_room(len(self._drains)):
                # No room here: a scan would offer nobody. Read the inbox once a drain of ours finishes or the
                # room grows (during a burst, scans that offered nobody were most of their CPU).
                await self._room_to_spare(None, started + SCAN_INTERVAL_S)
                continue
            # Customers this scan would skip anyway are not read: drained here already, or busy elsewhere.
            unread = [c for c in self._drains if c.open_kfid == open_kfid and _running(self._drains[c])]
            unread += self._elsewhere.skipped(open_kfid, now=started)
            try:
                pending = await self._store.customers_with_pending(open_kfid, unread=unread)
            except Exception:
                log.exception("listing pending customers of kf=%s failed", open_kfid)
                return
            # Instances sharing a burst take customers from opposite ends of the inbox (oldest first where
            # this instance pulled, newest first where another did), so they seldom reach for the same
            # customer: a drain that finds its customer held elsewhere costs store round trips for nothing.
            # Each customer's own order is the drain's.
            if open_kfid not in self._pulled_here:
                pending.reverse()
            now = loop.time()
            here = {c for c in pending if _running(self._drains.get(c))}
            candidates = [c for c in pending if c not in here and not self._elsewhere.skips(c, now=now)]
            share = self._others.share(
                open_kfid, len(candidates), now=now, pending=len(pending), mine=len(here)
            )
            left = took = 0
            for customer in candidates:
                if took < share and self._offer(customer):
                    took += 1
                else:
                    left += 1
            recheck = self._elsewhere.next_recheck(open_kfid, set(pending))
            if took:
                linger_until = loop.time() + SCAN_LINGER_S
            again = open_kfid in self._scan_again
            lingering = now < linger_until
            if not (left or recheck is not None or again or lingering):
                return
            await asyncio.sleep(max(SCAN_INTERVAL_S - (loop.time() - started), 0.0))
            if again or self._closing:
                continue
            if left:
                await self._room_to_spare(recheck, linger_until)
            elif not lingering and recheck is not None:
                # Only customers busy elsewhere remain: look again when the first is due (or when asked).
                await self._asked_to_scan(open_kfid, until=recheck)

    async def _asked_to_scan(self, open_kfid: str, *, until: float) -> None:
        loop = asyncio.get_running_loop()
        while open_kfid not in self._scan_again and not self._closing and loop.time() < until:
            await asyncio.sleep(min(SCAN_INTERVAL_S, max(until - loop.time(), 0.0)))

    async def _room_to_spare(self, recheck: float | None, linger_until: float) -> None:
        """Wait until a drain of ours finishes (room to spare), a customer busy elsewhere is due again, or the
        linger time is over, whichever comes first (and at most SCAN_INTERVAL_S: the answering side's room
        also grows without a drain finishing, as its limit rises in the first second of a burst)."""
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + SCAN_INTERVAL_S, max(linger_until, loop.time()))
        if recheck is not None:
            deadline = min(deadline, recheck)
        self._room_freed.clear()
        if self._room.has_room(len(self._drains)):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                await self._room_freed.wait()

    async def _drain_loop(self, customer: CustomerRef) -> None:
        wait = self._options.busy_poll_s
        while True:
            self._drain_again.discard(customer)
            try:
                outcome = await self._drain(customer)
            except Exception:
                log.exception("drain failed kf=%s customer=%s", customer.open_kfid, customer.external_userid)
                outcome = DrainOutcome.WAITING
            if self._closing:
                return
            if outcome is DrainOutcome.WAITING:
                if self._room.limited:
                    # Another instance holds the customer's oldest message and goes on with the rest: stop and
                    # free the room; a scan looks again after a back-off, in case that instance died.
                    now = asyncio.get_running_loop().time()
                    self._elsewhere.note(customer, now=now)
                    self._others.seen(customer.open_kfid, now=now)
                    self.scan(customer.open_kfid)
                    return
                await asyncio.sleep(wait * (1 + random.random() / 2))
                wait = min(wait * 1.5, 5.0)
                continue
            self._elsewhere.clear(customer)
            if customer not in self._drain_again:
                return

    async def _recovery_loop(self) -> None:
        """Pick up what lost callbacks and crashed instances left behind; also runs once at start."""
        correlation_id.set("recovery")
        interval = self._options.recovery_interval_s
        while not self._closing:
            try:
                await self.recover()
            except Exception:
                log.exception("recovery pass failed")
            if interval <= 0:
                return
            await asyncio.sleep(interval * (0.8 + random.random() * 0.4))

    async def recover(self) -> None:
        for open_kfid in await self._store.known_kfs():
            if self._room.limited:
                self.scan(open_kfid)
            else:
                for customer in await self._store.customers_with_pending(open_kfid):
                    self.drain(customer)
            self.notify(open_kfid)
