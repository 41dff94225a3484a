"""The pipeline on its own event loop and thread, so a callback's acknowledgement never waits behind answers.

`serve` (adapters/inbound/server.py) runs uvicorn on the main thread: sockets, HTTP parsing, signals and
graceful shutdown stay uvicorn's. Only the acknowledgement of a callback runs there (`front_door`): verify,
decrypt, answer `success`. Everything else (the lifespan that starts the pipeline, the admin API, the
console) is handed to `PipelineLoop`, a second event loop on a thread of its own, by `on_pipeline`, which
runs an ASGI app there and carries its `receive` and `send` back to the HTTP loop.

Why: on one event loop, the callbacks of a campaign burst queue behind the answer work that the burst itself
causes (reading hundreds of Dify streams that end within the same second, rendering and sending the
replies), and WeCom's acknowledgement p99 grew to hundreds of milliseconds (bench/FINDINGS.md, issue #14).
With two threads the interpreter switches to the HTTP thread within its switch interval whatever the
pipeline is doing, so an acknowledgement costs its own ~0.1 ms plus at most a few switch intervals.

What crosses between the threads, and how:
- the webhook's notice and its counters go to the pipeline loop through `PipelineLoop.call` (queued in
  order, one wake-up per batch, each call in the context it was made in, so log lines keep the callback's
  correlation id); nothing the pipeline owns is touched from the HTTP thread;
- a request handed to the pipeline (`on_pipeline`) awaits its `receive()` and `send()` on the HTTP loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from concurrent.futures import Future
from typing import Any, Final

log = logging.getLogger("kfdify.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The interpreter hands the GIL to a waiting thread after this long (CPython's default is 5 ms): the HTTP
# thread waits at most about this long per step of an acknowledgement while the pipeline computes.
SWITCH_INTERVAL_S: Final = 0.001
STOP_TIMEOUT_S: Final = 10.0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (Windows, PyPy): the standard loop does the same work
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class PipelineLoop:
    """An event loop running on its own thread until `stop()`."""

    def __init__(self, *, name: str = "pipeline") -> None:
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._running = threading.Event()
        self._calls: deque[tuple[contextvars.Context, Callable[..., object], tuple[Any, ...]]] = deque()
        self._flush_scheduled = False
        self._stopped = False
        self._background: set[asyncio.Task[object]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> PipelineLoop:
        self._thread.start()
        self._running.wait()
        return self

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the pipeline loop soon, in the caller's context; calls run in the order made.
        Never blocks, from any thread. Calls made after `stop()` are dropped."""
        if self._stopped:
            return
        self._calls.append((contextvars.copy_context(), fn, args))
        if not self._flush_scheduled:
            # Set before the wake-up: calls appended from here on are drained by the flush scheduled now
            # (it clears the flag before it drains), so every call runs and a burst costs one wake-up.
            self._flush_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                self._calls.clear()

    def _flush(self) -> None:
        self._flush_scheduled = False
        calls = self._calls
        while calls:
            context, fn, args = calls.popleft()
            try:
                context.run(fn, *args)
            except Exception:
                log.exception("a call handed to the pipeline failed")

    def background(self, fn: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run `fn()` as a task on the pipeline loop until it ends or the loop stops."""
        self.call(self._start_background, fn)

    def _start_background(self, fn: Callable[[], Coroutine[Any, Any, object]]) -> None:
        task = self._loop.create_task(fn())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Future[Any]:
        """Run `await fn(*args)` on the pipeline loop; the returned future is resolved there."""
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self._loop)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the loop (tasks still running are cancelled, as `asyncio.run` does) and join the thread."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the pipeline thread did not stop within %.0f s", timeout_s)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._running.set)
        try:
            loop.run_forever()
        finally:
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self._running.set()  # a failed start must not leave start() waiting


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def on_pipeline(app: ASGIApp, pipeline: PipelineLoop) -> ASGIApp:
    """`app` run on the pipeline loop, called from the HTTP loop: requests and the lifespan alike. Its
    `receive()` and `send()` are awaited on the HTTP loop, where uvicorn's protocol lives."""

    async def handed_over(scope: Scope, receive: Receive, send: Send) -> None:
        http_loop = asyncio.get_running_loop()
        ended: list[str] = []  # the lifespan's last message, once sent

        async def receive_here() -> Message:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_call(receive), http_loop))

        async def send_here(message: Message) -> None:
            if message["type"] in _LIFESPAN_ENDS:  # noted first: uvicorn may stop as soon as it has it
                ended.append(message["type"])
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_call(send, message), http_loop))

        try:
            await asyncio.wrap_future(pipeline.run(app, scope, receive_here, send_here))
        except asyncio.CancelledError:
            # uvicorn closes its loop as soon as the shutdown is complete, before the app's return crosses
            # back from the pipeline thread: that is the lifespan's normal end, not a failure to report.
            if not ended:
                raise

    return handed_over


_LIFESPAN_ENDS: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


async def _call(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return await fn(*args)


def front_door(*, webhook: ASGIApp, pipeline_app: ASGIApp) -> ASGIApp:
    """`POST /webhook` answered on the HTTP loop by `webhook`; everything else by `pipeline_app`."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/webhook" and scope["method"] == "POST":
            await webhook(scope, receive, send)
        else:
            await pipeline_app(scope, receive, send)

    return route


def prefer_short_switches() -> None:
    """Let a waiting thread take the interpreter after SWITCH_INTERVAL_S instead of 5 ms."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
