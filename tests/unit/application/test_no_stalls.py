"""Customers who write again the moment their reply lands are never left waiting (no lost wake-ups)."""

from __future__ import annotations

import asyncio
import random

import pytest

from adapters.outbound.fake_wecom import KfWorld
from tests.support.containers import fake_application, unit_settings

pytestmark = pytest.mark.anyio
KF = "wkNoStall"


async def test_back_to_back_conversations_never_stall() -> None:
    app = fake_application(unit_settings(rate_limit=0))
    world: KfWorld = app.adapters.world()
    dispatcher = app.dispatcher()
    customers, turns = 100, 10
    answered = {c: 0 for c in range(customers)}
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    seen = 0

    async def customer_loop() -> None:
        # Watch the fake WeCom: as soon as a customer's reply lands, that customer writes again and a callback
        # arrives, exactly as a chatting customer behaves.
        nonlocal seen
        while not done.is_set():
            while seen < len(world.sent):
                reply = world.sent[seen]
                seen += 1
                c = int(reply.customer.external_userid.removeprefix("wm"))
                answered[c] += 1
                if answered[c] < turns:
                    world.add_customer_text(KF, f"wm{c}", f"turn {answered[c]}")
                    # Callbacks arrive at any moment, e.g. just as a pull or drain finishes.
                    loop.call_later(random.random() * 0.002, dispatcher.notify, KF, "t")
            if all(n == turns for n in answered.values()):
                done.set()
            await asyncio.sleep(0)

    for c in range(customers):
        world.add_customer_text(KF, f"wm{c}", "turn 0")
    dispatcher.notify(KF, "t")
    watcher = asyncio.create_task(customer_loop())
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        done.set()
        await watcher
    assert all(n == turns for n in answered.values())
