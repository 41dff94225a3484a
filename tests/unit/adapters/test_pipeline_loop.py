"""The pipeline's own loop and thread: calls handed over in order and context, ASGI apps run there, and the
acknowledgement of a callback answered on the HTTP loop while the pipeline loop is stuck."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.inbound.pipeline_loop import PipelineLoop, front_door, on_pipeline
from adapters.inbound.wecom_crypto import WeComCrypto
from adapters.inbound.wecom_webhook import WeComWebhook
from application.telemetry import Telemetry, correlation_id
from domain.messages import CallbackNotice
from tests.support.service_process import signed_callback
from tests.support.stack import AES_KEY, TOKEN

CORP = "wwcorp0001"
tag: ContextVar[str] = ContextVar("tag", default="-")


@pytest.fixture
def pipeline() -> Iterator[PipelineLoop]:
    loop = PipelineLoop(name="pipeline-test").start()
    try:
        yield loop
    finally:
        loop.stop()


def test_calls_run_on_the_pipeline_thread_in_order_and_in_the_callers_context(pipeline: PipelineLoop) -> None:
    seen: list[tuple[int, str, str]] = []
    done = threading.Event()

    def record(n: int) -> None:
        seen.append((n, threading.current_thread().name, tag.get()))
        if n == 499:
            done.set()

    for n in range(500):
        tag.set(f"t{n}")
        pipeline.call(record, n)
    assert done.wait(10)
    assert [n for n, _, _ in seen] == list(range(500))
    assert {thread for _, thread, _ in seen} == {"pipeline-test"}
    assert all(context == f"t{n}" for n, _, context in seen)


def test_a_failing_call_is_logged_and_the_next_ones_still_run(
    pipeline: PipelineLoop, caplog: pytest.LogCaptureFixture
) -> None:
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("broken")

    pipeline.call(boom)
    pipeline.call(done.set)
    assert done.wait(10)
    assert "a call handed to the pipeline failed" in caplog.text


def test_stop_cancels_what_still_runs_and_later_calls_are_dropped() -> None:
    pipeline = PipelineLoop().start()
    cancelled = threading.Event()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pipeline.run(forever)
    assert started.wait(10)
    pipeline.stop()
    assert cancelled.is_set()
    assert pipeline.loop.is_closed()
    pipeline.call(print, "dropped")  # no error, nothing runs


async def _request(app: Any, method: str, path: str, query: str = "", body: bytes = b"") -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 11850),
    }
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_an_app_handed_over_runs_its_lifespan_and_requests_on_the_pipeline_thread(
    pipeline: PipelineLoop,
) -> None:
    threads: dict[str, str] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threads["startup"] = threading.current_thread().name
        yield
        threads["shutdown"] = threading.current_thread().name

    async def where(request: Request) -> JSONResponse:
        payload = await request.json()
        return JSONResponse({"thread": threading.current_thread().name, "echo": payload})

    starlette = Starlette(routes=[Route("/where", where, methods=["POST"])], lifespan=lifespan)
    app = on_pipeline(starlette, pipeline)

    async def scenario() -> tuple[int, bytes]:
        lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def put(message: Any) -> None:
            await lifespan_out.put(message)

        async def lifespan_run() -> None:
            await app({"type": "lifespan"}, lifespan_in.get, put)

        running = asyncio.create_task(lifespan_run())
        await lifespan_in.put({"type": "lifespan.startup"})
        assert (await lifespan_out.get())["type"] == "lifespan.startup.complete"
        answer = await _request(app, "POST", "/where", body=b'{"a": 1}')
        await lifespan_in.put({"type": "lifespan.shutdown"})
        assert (await lifespan_out.get())["type"] == "lifespan.shutdown.complete"
        await running
        return answer

    status, body = asyncio.run(scenario())
    assert status == 200
    assert body == b'{"thread":"pipeline-test","echo":{"a":1}}'
    assert threads == {"startup": "pipeline-test", "shutdown": "pipeline-test"}


def test_callbacks_are_acknowledged_while_the_pipeline_loop_is_stuck(pipeline: PipelineLoop) -> None:
    """The point of the second loop: a pipeline that computes (here: blocked outright) does not hold the
    acknowledgement; the notice and the counters reach it, in order, once it runs again."""
    notices: list[tuple[str, str, str]] = []
    telemetry = Telemetry()

    def on_notice(notice: CallbackNotice) -> None:
        notices.append((notice.open_kfid, threading.current_thread().name, correlation_id.get()))

    webhook = WeComWebhook(
        crypto=WeComCrypto(token=TOKEN, encoding_aes_key=AES_KEY, receive_id=CORP),
        on_notice=on_notice,
        telemetry=telemetry,
    )
    admin_calls: list[str] = []

    async def status(request: Request) -> JSONResponse:
        admin_calls.append(threading.current_thread().name)
        return JSONResponse({"callbacks": telemetry.counters["callbacks"]})

    front = front_door(
        webhook=webhook.handed_off(pipeline.call),
        pipeline_app=on_pipeline(Starlette(routes=[Route("/status", status)]), pipeline),
    )
    release = threading.Event()
    stuck = threading.Event()

    def block() -> None:
        stuck.set()
        release.wait(30)

    pipeline.call(block)
    assert stuck.wait(10)

    async def acks() -> list[tuple[int, bytes]]:
        answers = []
        for n in range(3):
            params, body = signed_callback(CORP, f"wkKF{n}")
            answers.append(await _request(front, "POST", "/webhook", urlencode(params), body))
        return answers

    try:
        assert asyncio.run(acks()) == [(200, b"success")] * 3
        assert notices == []  # the pipeline has not run yet: nothing was done on the HTTP thread
    finally:
        release.set()
    status_code, body = asyncio.run(_request(front, "GET", "/status"))
    assert status_code == 200
    assert body == b'{"callbacks":3}'  # the counters were recorded before /status ran: calls keep order
    assert [kf for kf, _, _ in notices] == ["wkKF0", "wkKF1", "wkKF2"]
    assert {thread for _, thread, _ in notices} == {"pipeline-test"}
    assert all(cid.startswith("cb-") for _, _, cid in notices)
    assert len({cid for _, _, cid in notices}) == 3
    assert admin_calls == ["pipeline-test"]
    assert telemetry.series["callback_ack"].count == 3


def test_the_url_check_and_other_methods_of_webhook_go_to_the_app(pipeline: PipelineLoop) -> None:
    """Only `POST /webhook` is answered on the HTTP loop; `GET /webhook` (URL verification) is the app's."""
    seen: list[str] = []

    async def verify(request: Request) -> JSONResponse:
        seen.append(threading.current_thread().name)
        return JSONResponse({"ok": True})

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("GET must not reach the acknowledging webhook")

    front = front_door(
        webhook=never, pipeline_app=on_pipeline(Starlette(routes=[Route("/webhook", verify)]), pipeline)
    )
    assert asyncio.run(_request(front, "GET", "/webhook"))[0] == 200
    assert seen == ["pipeline-test"]


def test_a_notice_keeps_its_type(pipeline: PipelineLoop) -> None:
    got: list[CallbackNotice] = []
    done = threading.Event()

    def on_notice(notice: CallbackNotice) -> None:
        got.append(notice)
        done.set()

    notice = CallbackNotice(event="kf_msg_or_event", open_kfid="wkX", token="T1")
    pipeline.call(on_notice, notice)
    assert done.wait(10)
    assert got == [notice]
