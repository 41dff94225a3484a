"""A tiny fake Dify for benchmarks: `POST /v1/chat-messages` streams a fixed Markdown answer as SSE.

A bare ASGI app (no router, no recording) in its own process, so it is never the bottleneck. It waits
`delay` seconds before the response starts (Dify "thinking"), then sends one `message` event per
`chunk` characters and a `message_end`, each as its own write, as Dify does.

    python -m bench.fake_dify --port P
    POST /_bench/config {"delay": 2.0, "chunk": 4, "capacity": 40}   GET /_bench/stats   POST /_bench/reset

Progressive replies row: config `{"answer": "long", "stream_s": 10, "moderation": 0}` streams LONG_ANSWER
(about 6 KB) evenly over `stream_s` seconds; `GET /v1/parameters` reports output moderation as configured.

Stats: requests served, streams open now, the most streams open at once (`peak`), and how many TCP
connections those requests came on (`connections`: distinct client ports since the last reset).
Capacity mode (`capacity` > 0): like a Dify app with a concurrency limit, a request that arrives while
`capacity` answers are in flight is refused at once with 429 `too_many_requests` (docs/dify.md), optionally
with a `Retry-After` header (`retry_after` seconds; 0 = none). 0 = no limit.

Stats: requests served, streams open now, the most streams open at once (`peak`), how many TCP
connections those requests came on (`connections`: distinct client ports since the last reset), and how
many requests were refused with 429 (`rejected`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from bench.common import HOST, UVICORN_SETTINGS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A typical customer-service answer: a little Markdown (bold, an ordered list), about 100 CJK characters.
ANSWER = (
    "您好！关于您的问题，以下是**三个要点**：\n\n"
    "1. 订单一般会在 24 小时内发货，节假日顺延。\n"
    "2. 如需修改收货地址，请在发货前联系我们。\n"
    "3. 退换货请在签收后 7 天内申请，商品需保持完好。\n\n"
    "如有其他问题，欢迎随时咨询。"
)
# About 6 KB of plain paragraphs: an answer long enough for three or four WeChat messages.
LONG_ANSWER = "\n\n".join(
    "".join(f"第{i}段第{j}句，这里说明一项具体的注意事项。" for j in range(12)) for i in range(8)
)
_USAGE = {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60, "latency": 0.01}


class FakeDify:
    def __init__(self) -> None:
        self.delay = 0.0
        self.chunk = 4
        self.capacity = 0
        self.retry_after = 0.0
        self.rejected = 0
        self.requests = 0
        self.active = 0
        self.peak = 0
        self.clients: set[tuple[str, int]] = set()  # distinct client (host, port): TCP connections seen
        self.answer = "short"  # "long": LONG_ANSWER, streamed evenly over `stream_s` seconds
        self.stream_s = 0.0
        self.moderation = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        body = await _read_body(receive)
        if path == "/v1/chat-messages" and method == "POST":
            client = scope.get("client")
            if client:
                self.clients.add((client[0], client[1]))
            await self._chat(json.loads(body), send)
        elif path == "/_bench/config" and method == "POST":
            config = json.loads(body or b"{}")
            self.delay = float(config.get("delay", self.delay))
            self.chunk = max(1, int(config.get("chunk", self.chunk)))
            self.answer = str(config.get("answer", self.answer))
            self.stream_s = float(config.get("stream_s", self.stream_s))
            self.moderation = bool(config.get("moderation", self.moderation))
            self.capacity = max(0, int(config.get("capacity", self.capacity)))
            self.retry_after = max(0.0, float(config.get("retry_after", self.retry_after)))
            await _json(send, self._stats())
        elif path == "/v1/parameters" and method == "GET":
            await _json(send, _parameters(self.moderation))
        elif path == "/_bench/reset" and method == "POST":
            self.requests = self.peak = self.rejected = 0
            self.clients.clear()
            await _json(send, self._stats())
        elif path in ("/_bench/stats", "/healthz"):
            await _json(send, self._stats())
        else:
            await _json(send, {"code": "not_found", "message": "Not Found", "status": 404}, 404)

    def _stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "active": self.active,
            "peak": self.peak,
            "connections": len(self.clients),
            "delay": self.delay,
            "chunk": self.chunk,
            "capacity": self.capacity,
            "rejected": self.rejected,
        }

    async def _chat(self, question: dict[str, Any], send: Send) -> None:
        if self.capacity and self.active >= self.capacity:
            self.rejected += 1
            headers = [(b"retry-after", f"{self.retry_after:g}".encode())] if self.retry_after else []
            refusal = {"code": "too_many_requests", "message": "Too many requests.", "status": 429}
            await _json(send, refusal, 429, headers)
            return
        self.requests += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            conversation_id = question.get("conversation_id") or str(uuid.uuid4())
            message_id = str(uuid.uuid4())
            common = {
                "task_id": message_id,
                "id": message_id,
                "message_id": message_id,
                "conversation_id": conversation_id,
                "created_at": int(time.time()),
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                }
            )
            text = LONG_ANSWER if self.answer == "long" else f"{question.get('query', '')}\n" + ANSWER
            pause = self.stream_s * self.chunk / len(text) if self.answer == "long" else 0.0
            for i in range(0, len(text), self.chunk):
                if pause and i:
                    await asyncio.sleep(pause)
                event = {"event": "message", **common, "answer": text[i : i + self.chunk]}
                await send({"type": "http.response.body", "body": _sse(event), "more_body": True})
            end = {"event": "message_end", **common, "metadata": {"usage": _USAGE}}
            await send({"type": "http.response.body", "body": _sse(end), "more_body": False})
        finally:
            self.active -= 1


def _parameters(moderation: bool) -> dict[str, Any]:
    """`GET /parameters`: the features the service reads; only output moderation varies."""
    off = {"enabled": False}
    return {
        "opening_statement": "",
        "suggested_questions": [],
        "suggested_questions_after_answer": off,
        "speech_to_text": off,
        "text_to_speech": off,
        "retriever_resource": off,
        "annotation_reply": off,
        "more_like_this": off,
        "sensitive_word_avoidance": {"enabled": moderation, "type": "keywords" if moderation else ""},
        "user_input_form": [],
        "file_upload": {},
        "system_parameters": {"file_size_limit": 15, "image_file_size_limit": 10},
    }


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(
    send: Send, payload: dict[str, Any], status: int = 200, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_dify")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(FakeDify(), host=HOST, port=args.port, lifespan="off", backlog=4096, **UVICORN_SETTINGS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
