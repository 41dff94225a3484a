"""Waiters served in turns across customers: a customer with fifty waiting requests delays nobody, and each
customer's own requests keep their order."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Waiters per customer; customers take turns in the order their turn came up."""

    def __init__(self) -> None:
        self._by_customer: dict[Hashable, deque[asyncio.Future[T]]] = {}  # insertion order = turn order
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def customers(self) -> int:
        return len(self._by_customer)

    def push(self, customer: Hashable, waiter: asyncio.Future[T], *, first: bool = False) -> None:
        """Queue `waiter`; `first`: at the head of the queue (a retry: it arrived before everyone waiting)."""
        if first:
            waiters = self._by_customer.pop(customer, deque())
            waiters.appendleft(waiter)
            self._by_customer = {customer: waiters, **self._by_customer}
        else:
            self._by_customer.setdefault(customer, deque()).append(waiter)
        self.size += 1

    def pop(self) -> asyncio.Future[T] | None:
        """The next live waiter (its customer goes to the back of the round), or None."""
        while self._by_customer:
            customer = next(iter(self._by_customer))
            waiters = self._by_customer[customer]
            waiter = waiters.popleft()
            self.size -= 1
            if waiter.done():  # cancelled, its task not yet run: the customer keeps their place
                if not waiters:
                    del self._by_customer[customer]
                continue
            del self._by_customer[customer]
            if waiters:
                self._by_customer[customer] = waiters  # re-inserted: last in turn order
            return waiter
        return None

    def remove(self, customer: Hashable, waiter: asyncio.Future[T]) -> bool:
        waiters = self._by_customer.get(customer)
        if waiters is None or waiter not in waiters:
            return False
        waiters.remove(waiter)
        self.size -= 1
        if not waiters:
            del self._by_customer[customer]
        return True
