"""The console's try-it chat (adapters/inbound/console_api.py) over `simulate`'s parts: the welcome a customer
entering the session gets and the suggestion menus, as WeChat would show them. bootstrap.build_try_chat wires
it to an in-memory WeCom and the route's real Dify engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from adapters.inbound.cli_simulate import SimulationParts
from adapters.inbound.console_api import Bubble

# A message sent on a session event: its text and, for a menu, its (id, content) click items.
EventMessage = tuple[str, tuple[tuple[str, str], ...]]


class ConsoleTryChat:
    """`parts`: the simulation; `enter_session` makes the simulated customer enter the session;
    `event_menus` lists the menus sent to that customer on session events, oldest first."""

    def __init__(
        self,
        parts: SimulationParts,
        *,
        enter_session: Callable[[], object],
        event_menus: Callable[[], Sequence[EventMessage]],
        app_label: str,
    ) -> None:
        self._parts = parts
        self._enter_session = enter_session
        self._event_menus = event_menus
        self.app_label = app_label

    def push_text(self, text: str) -> None:
        self._parts.push_text(text)

    def notify(self) -> None:
        self._parts.notify()

    async def idle(self) -> None:
        await self._parts.idle()

    async def start(self) -> None:
        await self._parts.start()
        # The customer enters the session first: the welcome (and its suggestion menu) comes before any
        # answer, as in WeChat.
        self._enter_session()
        self._parts.notify()
        await self._parts.idle()

    async def stop(self) -> None:
        await self._parts.stop()

    def sent(self) -> list[Bubble]:
        menus = list(self._event_menus())
        bubbles = []
        for text in self._parts.sent_texts():
            if menus and menus[0][0] == text:
                bubbles.append(Bubble("menu", text, menus.pop(0)[1]))
            else:
                bubbles.append(Bubble("text", text))
        return bubbles
