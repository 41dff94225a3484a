"""`python bootstrap.py simulate`: chat with the bot in the console, as a WeChat customer would.

Each line typed goes through the real application core (commands, Dify, reply splitting); every text the bot
would send to WeChat is printed as its own bubble, with its size, so a long answer split into several WeChat
messages shows as several bubbles, each as soon as it is sent (a long answer's first parts go out while Dify
still writes). A menu of suggested questions shows as numbered items: typing the number taps the item, as a
customer would in WeChat. The caller wires the core to an in-memory kf channel and passes callables,
so this inbound adapter never imports the outbound ones.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

QUIT_WORDS: Final = frozenset({"/quit", "/exit"})
PROMPT: Final = "you> "
# How often a turn looks for bubbles sent while the bot is still answering.
_POLL_S: Final = 0.05

Menu = tuple[str, Sequence[tuple[str, str]]]  # head, (id, content) click items

SIMULATED_KF: Final = "wk-simulate"
SIMULATED_CUSTOMER: Final = "wm-operator"


@dataclass(frozen=True, slots=True)
class SimulationParts:
    """The real application core and Dify adapter with an in-process WeCom and store, for `simulate`
    (bootstrap.build_simulation wires them)."""

    push_text: Callable[[str], None]
    sent_texts: Callable[[], list[str]]
    notify: Callable[[], None]
    idle: Callable[[], Awaitable[None]]
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]
    app_label: str
    sent_menus: Callable[[], Sequence[Menu]] | None = None
    push_tap: Callable[[str, str], None] | None = None
    # How many texts the merge window has folded into an earlier one's question so far.
    merged_count: Callable[[], int] | None = None


def run_parts(
    parts: SimulationParts,
    *,
    stdin: TextIO,
    stdout: TextIO,
    reset_words: Sequence[str] = (),
    entry_note: str = "",
    merge_window_s: float = 0.0,
) -> int:
    """run_simulate with the wired parts."""
    return run_simulate(
        push_text=parts.push_text,
        sent_texts=parts.sent_texts,
        notify=parts.notify,
        idle=parts.idle,
        start=parts.start,
        stop=parts.stop,
        app_label=parts.app_label,
        stdin=stdin,
        stdout=stdout,
        reset_words=reset_words,
        sent_menus=parts.sent_menus,
        push_tap=parts.push_tap,
        entry_note=entry_note,
        merge_window_s=merge_window_s,
        merged_count=parts.merged_count,
    )


def run_simulate(
    *,
    push_text: Callable[[str], None],
    sent_texts: Callable[[], list[str]],
    notify: Callable[[], None],
    idle: Callable[[], Awaitable[None]],
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    app_label: str,
    stdin: TextIO,
    stdout: TextIO,
    reset_words: Sequence[str] = (),
    sent_menus: Callable[[], Sequence[Menu]] | None = None,
    push_tap: Callable[[str, str], None] | None = None,
    entry_note: str = "",
    merge_window_s: float = 0.0,
    merged_count: Callable[[], int] | None = None,
) -> int:
    """Run the REPL until /quit, /exit or end of input; 0 then, 1 when start() fails, 130 on Ctrl-C.

    push_text(line) puts a customer message into the fake WeChat; notify() tells the core new messages wait
    (as a callback would); idle() returns once the core has handled everything; sent_texts() lists every
    text the bot sent so far, oldest first. start()/stop() are the service's lifecycle. sent_menus() lists
    every menu the bot sent so far; push_tap(content, menu_id) puts a tapped menu item into the fake WeChat.

    With `merge_window_s` > 0 the bot asks a burst of lines as one question, as in WeChat: lines typed (or
    piped) while it still waits for more are sent at once, its replies shown when it is done, and a note
    says how many lines were merged (`merged_count()`: the core's `merged_messages` counter).
    """
    repl = _Repl(
        push_text=push_text,
        sent_texts=sent_texts,
        sent_menus=sent_menus,
        push_tap=push_tap,
        notify=notify,
        idle=idle,
        start=start,
        stop=stop,
        stdin=stdin,
        stdout=stdout,
        burst=merge_window_s > 0,
        merged_count=merged_count,
    )
    _write(stdout, banner(app_label, reset_words))
    if entry_note:
        _write(stdout, entry_note)
    try:
        return asyncio.run(repl.run())
    except KeyboardInterrupt:
        _write(stdout, "\n再见 / bye\n")
        return 130


def entry_note(scene: str, scene_param: str, nickname: str) -> str:
    """The simulated customer's entry and nickname (`--scene`, `--scene-param`, `--nickname`), shown once."""
    if not (scene or scene_param or nickname):
        return ""
    shown = [f"{name}={value}" for name, value in (("nickname", nickname), ("scene", scene)) if value]
    if scene_param:
        shown.append(f"scene_param={scene_param}")
    return "模拟客户 / simulated customer: " + ", ".join(shown) + "\n\n"


def banner(app_label: str, reset_words: Sequence[str] = ()) -> str:
    words = "、".join(reset_words[:4]) if reset_words else "重置"
    return (
        "kf-dify 控制台模拟 / console simulation\n"
        f"正在与 {app_label} 对话，像微信客户一样输入消息\n"
        f"you are talking to {app_label} as a WeChat customer would\n"
        f"重置词（{words}）与微信中一样生效 / reset words work as in WeChat\n"
        "输入 /quit 退出 / type /quit to leave\n"
        "\n"
    )


def format_bubbles(texts: Sequence[str], *, first: int = 1, total: int | None = None) -> str:
    """Each text as WeChat would show it: a header with its position and UTF-8 size, then the text.
    `first`: the position of the first text; `total`: how many the turn has (None: len(texts) + first - 1);
    0 while the bot is still answering ("…")."""
    if not texts:
        return "[bot · 没有回复 / no reply]\n\n"
    count = "…" if total == 0 else str(total if total is not None else len(texts) + first - 1)
    parts = []
    for index, text in enumerate(texts, start=first):
        size = len(text.encode("utf-8"))
        parts.append(f"[bot {index}/{count} · {size} bytes]\n{text}\n\n")
    return "".join(parts)


def format_menu(menu: Menu) -> str:
    """A msgmenu as the customer sees it: the head, then the click items numbered for tapping."""
    head, items = menu
    lines = [f"[bot 菜单 / menu · {len(items)} items]", head]
    lines += [f"  {number}) {content}" for number, (_, content) in enumerate(items, start=1)]
    lines.append("（输入编号即点选 / type a number to tap）")
    return "\n".join(lines) + "\n\n"


class _Repl:
    def __init__(
        self,
        *,
        push_text: Callable[[str], None],
        sent_texts: Callable[[], list[str]],
        notify: Callable[[], None],
        idle: Callable[[], Awaitable[None]],
        start: Callable[[], Awaitable[None]],
        stop: Callable[[], Awaitable[None]],
        stdin: TextIO,
        stdout: TextIO,
        sent_menus: Callable[[], Sequence[Menu]] | None = None,
        push_tap: Callable[[str, str], None] | None = None,
        burst: bool = False,
        merged_count: Callable[[], int] | None = None,
    ) -> None:
        self._burst = burst
        self._merged_count = merged_count or (lambda: 0)
        self._ahead: asyncio.Future[str] | None = None  # a line read while the bot was busy
        self._push_text = push_text
        self._sent_texts = sent_texts
        self._sent_menus = sent_menus or (lambda: ())
        self._push_tap = push_tap
        self._menus_seen = 0
        self._menu: Sequence[tuple[str, str]] = ()  # the last menu's items, tappable by number
        self._notify = notify
        self._idle = idle
        self._start = start
        self._stop = stop
        self._stdin = stdin
        self._stdout = stdout
        self._interactive = _isatty(stdin)

    async def run(self) -> int:
        try:
            try:
                await self._start()
            except Exception as exc:
                _write(self._stdout, f"无法启动 / could not start: {type(exc).__name__}: {exc}\n")
                return 1
            seen = len(self._sent_texts())
            self._menus_seen = len(self._sent_menus())
            while True:
                if self._interactive:
                    _write(self._stdout, PROMPT)
                line = await self._next_line()
                if line == "":  # end of input
                    if self._interactive:
                        _write(self._stdout, "\n")
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text.lower() in QUIT_WORDS:
                    return 0
                seen = await self._turn(text, seen)
        finally:
            if self._ahead is not None:
                self._ahead.cancel()
            await self._stop()

    def _next_line(self) -> asyncio.Future[str]:
        ahead, self._ahead = self._ahead, None
        return ahead if ahead is not None else asyncio.ensure_future(_readline(self._stdin))

    async def _turn(self, text: str, seen: int) -> int:
        """Send one customer message (or tap a menu item by its number), print each bubble as the bot sends
        it and any menu at the end. Returns the new number of texts seen."""
        printed = seen
        merged_before = self._merged_count()
        try:
            self._send(text)
            self._notify()
            if self._burst:
                # Lines typed meanwhile go out too (the bot may merge them); the replies follow at the end.
                await self._idle_taking_more_lines()
            else:
                idle = asyncio.ensure_future(self._idle())
                try:
                    while not (await asyncio.wait({idle}, timeout=_POLL_S))[0]:
                        sent = self._sent_texts()
                        if len(sent) > printed:  # sent while the bot still answers
                            _write(
                                self._stdout,
                                format_bubbles(sent[printed:], first=printed - seen + 1, total=0),
                            )
                            printed = len(sent)
                finally:
                    idle.cancel()
                idle.result()
        except Exception as exc:  # show it and keep the session: the operator is debugging
            _write(self._stdout, f"[error · {type(exc).__name__}: {exc}]\n\n")
        merged = self._merged_count() - merged_before
        if merged > 0:
            _write(
                self._stdout,
                f"[{merged} 条消息并入前一条一起提问 / {merged} line(s) asked with the one before]\n",
            )
        sent = self._sent_texts()
        if printed == seen or len(sent) > printed:
            _write(
                self._stdout,
                format_bubbles(sent[printed:], first=printed - seen + 1, total=len(sent) - seen),
            )
        menus = self._sent_menus()
        for menu in menus[self._menus_seen :]:
            _write(self._stdout, format_menu(menu))
            self._menu = menu[1]
        self._menus_seen = len(menus)
        return len(sent)

    def _send(self, text: str) -> None:
        """A number that names an item of the last menu taps it; anything else is typed."""
        if self._push_tap is not None and text.isdigit() and 1 <= int(text) <= len(self._menu):
            item_id, content = self._menu[int(text) - 1]
            _write(self._stdout, f"[you · 点选 / tapped: {content}]\n")
            self._push_tap(content, item_id)
            return
        self._push_text(text)

    async def _idle_taking_more_lines(self) -> None:
        """Wait for the bot, sending on the lines typed meanwhile (it may merge them, as in WeChat)."""
        idle: asyncio.Future[None] = asyncio.ensure_future(self._idle())
        try:
            while True:
                line = self._next_line()
                waiting: set[asyncio.Future[Any]] = {idle, line}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                text = line.result().strip() if line.done() else ""
                if not line.done() or line.result() == "" or text.lower() in QUIT_WORDS:
                    self._ahead = line  # the next turn's line, the end of input or /quit: after the bot
                    await idle
                    return
                if text:
                    self._push_text(text)
                    self._notify()
                    if idle.done():  # it finished just as the line came: wait for this one too
                        idle = asyncio.ensure_future(self._idle())
        finally:
            if not idle.done():
                idle.cancel()


async def _readline(stdin: TextIO) -> str:
    """One line from `stdin` without blocking the event loop.

    A daemon thread per line rather than the loop's default executor: on Ctrl-C, asyncio.run() waits for the
    default executor's threads, and one blocked in readline() would hold the exit until Enter is pressed.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def deliver(line: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(line or "")

    def read() -> None:
        line: str | None = None
        error: BaseException | None = None
        try:
            line = stdin.readline()
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, line, error)
        except RuntimeError:  # the loop is gone (Ctrl-C while this thread was reading)
            pass

    threading.Thread(target=read, name="simulate-stdin", daemon=True).start()
    return await future


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _write(stdout: TextIO, text: str) -> None:
    stdout.write(text)
    stdout.flush()
