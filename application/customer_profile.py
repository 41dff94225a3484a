"""Who each customer is and where they came from, learnt without ever holding up an answer.

`ProfileBook` keeps every customer's profile in the shared store (the `ProfileStore` role, so every instance
sees it) and asks WeCom's `kf/customer/batchget` (docs/wecom-kf.md §11) at most once per customer per day:
customers wanted within a short window go out together, up to 100 ids a call, in the background. The entry
context comes from `enter_session` events (`note_entry`) and from batchget's session context.

The answer path only reads what is stored (`lookup`). A customer nobody has fetched yet waits for the fetch
under way at most `wait_s` (a short bound: WeCom usually answers within a few hundred milliseconds); a failed
fetch wakes them at once, and a WARNING names WeCom's errcode (48002: the app lacks the customer-info
permission). After a failure batchget rests for `failure_retry_s` (six times that after a configuration
errcode such as 48002, which only the operator can fix).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from application.errors import WeComError
from application.ports import CustomerDirectory, ProfileStore
from application.telemetry import Telemetry
from domain.customer import CustomerBatch, CustomerProfile, EntryContext
from domain.messages import CustomerRef

log = logging.getLogger("kfdify.profile")

BATCH_MAX_IDS = 100  # kf/customer/batchget takes at most 100 ids a call (docs/wecom-kf.md §11)
_HINTS = {48002: " (the app lacks the customer-info permission: grant it in the WeCom admin console)"}


class ProfileBook:
    def __init__(
        self,
        *,
        store: ProfileStore,
        directory: CustomerDirectory,
        telemetry: Telemetry,
        clock: Callable[[], float] = time.time,
        refresh_s: float = 24 * 3600.0,
        batch_window_s: float = 0.05,
        wait_s: float = 1.0,
        failure_retry_s: float = 600.0,
    ) -> None:
        self._store = store
        self._directory = directory
        self._telemetry = telemetry
        self._clock = clock
        self._refresh_s = refresh_s
        self._window_s = batch_window_s
        self._wait_s = wait_s
        self._failure_retry_s = failure_retry_s
        self._resting_until = 0.0
        # Customers to fetch, each with the future their lookups wait on (done when their batch is).
        self._wanted: dict[CustomerRef, asyncio.Future[None]] = {}
        self._in_flight: dict[CustomerRef, asyncio.Future[None]] = {}
        self._collector: asyncio.Task[None] | None = None

    # --- the answer path ------------------------------------------------------------------------------

    async def lookup(self, customer: CustomerRef) -> CustomerProfile | None:
        """The customer's profile as far as it is known now (None: nothing yet). Never raises."""
        profile = await self._read(customer)
        if profile is not None and not profile.needs_fetch(now=self._clock(), refresh_s=self._refresh_s):
            return profile
        pending = self._want(customer)
        if pending is None or self._wait_s <= 0 or (profile is not None and profile.fetched_at > 0):
            return profile  # a stale profile serves while the new one is fetched
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pending), self._wait_s)
        return await self._read(customer) or profile

    async def note_entry(self, customer: CustomerRef, entry: EntryContext) -> None:
        """An enter_session event told where the customer came from: keep it, and fetch their profile now so
        it is there when they write. Never raises."""
        if entry.is_empty:
            self._want_if_missing(await self._read(customer), customer)
            return
        profile = await self._read(customer)
        await self._write(customer, (profile or CustomerProfile()).with_entry(entry))
        self._want_if_missing(profile, customer)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def idle(self) -> None:
        """Wait until no fetch is wanted or under way (tests)."""
        while self._collector is not None and not self._collector.done():
            await asyncio.wait({self._collector})

    async def aclose(self) -> None:
        if self._collector is not None and not self._collector.done():
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        for future in [*self._wanted.values(), *self._in_flight.values()]:
            if not future.done():
                future.set_result(None)

    # --- fetching -------------------------------------------------------------------------------------

    def _want_if_missing(self, profile: CustomerProfile | None, customer: CustomerRef) -> None:
        if profile is None or profile.needs_fetch(now=self._clock(), refresh_s=self._refresh_s):
            self._want(customer)

    def _want(self, customer: CustomerRef) -> asyncio.Future[None] | None:
        """The future the customer's fetch completes; None while batchget rests after a failure."""
        known = self._in_flight.get(customer) or self._wanted.get(customer)
        if known is not None:
            return known
        if self._clock() < self._resting_until:
            return None
        future = self._wanted[customer] = asyncio.get_running_loop().create_future()
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect())
        return future

    async def _collect(self) -> None:
        """Wait a moment for more customers, then fetch every wanted one, 100 ids a call."""
        await asyncio.sleep(self._window_s)
        while self._wanted:
            batch: dict[CustomerRef, asyncio.Future[None]] = {}
            ids: set[str] = set()
            for customer in list(self._wanted):
                if customer.external_userid not in ids and len(ids) >= BATCH_MAX_IDS:
                    continue
                ids.add(customer.external_userid)
                batch[customer] = self._wanted.pop(customer)
            self._in_flight.update(batch)
            try:
                await self._fetch(batch, sorted(ids))
            finally:
                for customer, future in batch.items():
                    self._in_flight.pop(customer, None)
                    if not future.done():
                        future.set_result(None)

    async def _fetch(self, batch: dict[CustomerRef, asyncio.Future[None]], ids: list[str]) -> None:
        try:
            answer = await self._directory.get_customers(ids, with_context=True)
        except WeComError as exc:
            self._failed(exc.errcode, exc.errmsg, config=exc.is_config_error)
            return
        except Exception as exc:  # whatever happens, the answers go on without profiles
            self._failed(None, type(exc).__name__)
            return
        self._telemetry.count("profiles_fetched", len(answer.profiles))
        for customer in batch:
            await self._learn(customer, answer)

    def _failed(self, errcode: int | None, errmsg: str, *, config: bool = False) -> None:
        self._telemetry.count_labelled("profile_failures", str(errcode))
        # A missing permission stays missing until the operator acts: ask (and warn) less often.
        rest = self._failure_retry_s * (6 if config else 1)
        self._resting_until = self._clock() + rest
        log.warning(
            "customer profiles unavailable: kf/customer/batchget errcode=%s %s%s; answering without them, "
            "next try in %.0f s",
            errcode,
            errmsg[:200],
            _HINTS.get(errcode or 0, ""),
            rest,
        )
        # Nobody waits for this batch any longer; whoever wanted a fetch meanwhile tries after the rest.
        for future in self._wanted.values():
            if not future.done():
                future.set_result(None)
        self._wanted.clear()

    async def _learn(self, customer: CustomerRef, answer: CustomerBatch) -> None:
        fresh = answer.profiles.get(customer.external_userid)
        # An id WeCom does not know is remembered as fetched (no nickname) so it is not asked again today.
        current = await self._read(customer) or CustomerProfile()
        await self._write(customer, current.fetched(fresh or CustomerProfile(), now=self._clock()))

    async def _read(self, customer: CustomerRef) -> CustomerProfile | None:
        try:
            return await self._store.get_profile(customer)
        except Exception as exc:
            log.warning("customer profile not read: %s", type(exc).__name__)
            return None

    async def _write(self, customer: CustomerRef, profile: CustomerProfile) -> None:
        try:
            await self._store.put_profile(customer, profile)
        except Exception as exc:
            log.warning("customer profile not stored: %s", type(exc).__name__)
