"""Conformance with Dify's published API (docs/dify-schemas.json, made by scripts/dify_schemas.py).

What the Dify adapter sends is checked against the request schemas, and what the test doubles send back (the
local Dify server's streams and answers, the benchmark's fake Dify) against the event and answer schemas, so
neither the adapter nor the doubles drift from Dify 1.16 unnoticed.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.outbound.audio import silent_wav
from adapters.outbound.dify import DifyChatEngine
from bench.fake_dify import FakeDify
from domain.chat import Attachment, Question
from scripts.dify_schemas import build
from tests.support import media_samples
from tests.support.dify_server import SESSION_REQUESTS, FakeDifyHost, FakeDifyServer, Fault, RecordedRequest
from tests.support.http_server import serve
from tests.support.schema_check import SCHEMAS_PATH, dify_schemas, problems

pytestmark = pytest.mark.anyio

API_KEY = "app-conformance-key"
PROSE = {"description", "summary", "example", "examples", "title", "externalDocs", "discriminator"}
# The operation each path of the local server stands for in docs/dify-schemas.json.
OPERATIONS = {
    ("POST", "/v1/chat-messages"): "POST /chat-messages",
    ("POST", "/v1/files/upload"): "POST /files/upload",
    ("POST", "/v1/audio-to-text"): "POST /audio-to-text",
    ("GET", "/v1/parameters"): "GET /parameters",
    ("GET", "/v1/info"): "GET /info",
}
# Operations whose path carries an id: (method, path pattern) → operation.
TEMPLATED_OPERATIONS = {
    ("GET", re.compile(r"/v1/messages/[^/]+/suggested")): "GET /messages/{message_id}/suggested",
    ("POST", re.compile(r"/v1/messages/[^/]+/feedbacks")): "POST /messages/{message_id}/feedbacks",
    ("POST", re.compile(r"/v1/conversations/[^/]+/name")): "POST /conversations/{conversation_id}/name",
}
# What the local server streams for each kind of app and feature (recorded shapes of the published ones).
STREAMS: dict[str, tuple[str, Fault]] = {
    "chat": ("chat", Fault()),
    "chat-files-tts-moderation": (
        "chat",
        Fault(files=(("image", "/files/tools/a.png?sign=s"),), tts=True, replace_with="已屏蔽"),
    ),
    "agent-chat": ("agent-chat", Fault(files=(("image", "/files/tools/a.png?sign=s"),))),
    "new-agent": (
        "agent",
        Fault(files=(("document", "/files/tools/b.pdf?sign=s"),), files_in_message_end=True),
    ),
    "chatflow": ("advanced-chat", Fault(progress_events=True, reasoning="先想一想。", tts=True)),
    "chatflow-paused": ("advanced-chat", Fault(workflow_paused=True, paused_after=1)),
    "chatflow-failed": ("advanced-chat", Fault(workflow_failed=True)),
    "error-mid-stream": ("chat", Fault(error_after=1, error_status=429, error_code="rate_limit_error")),
    "unknown-event-and-pings": ("chat", Fault(unknown_event=True, pings_between=True)),
}
# Every event of a chat app's stream the test doubles must show (issue #15's list).
EXPECTED_EVENTS = {
    "message", "agent_message", "agent_thought", "message_file", "message_end", "message_replace",
    "reasoning_chunk", "tts_message", "tts_message_end", "workflow_started", "workflow_finished",
    "node_started", "node_finished", "node_retry", "iteration_started", "iteration_next",
    "iteration_completed", "loop_started", "loop_next", "loop_completed", "agent_log",
    "workflow_paused", "human_input_required", "error", "ping",
}  # fmt: skip


@pytest.fixture(scope="module")
def dify_host() -> Iterator[tuple[FakeDifyHost, str]]:
    host = FakeDifyHost()
    with serve(host) as url:
        yield host, url


@pytest.fixture
def dify(dify_host: tuple[FakeDifyHost, str]) -> FakeDifyServer:
    host, _ = dify_host
    host.server = FakeDifyServer(
        api_key=API_KEY,
        ping_interval=0.05,
        hang_limit=5,
        speech_to_text=True,
        file_upload={"enabled": True, "allowed_file_types": ["image", "document"], "number_limits": 3},
    )
    return host.server


@pytest.fixture
async def engine(dify_host: tuple[FakeDifyHost, str], anyio_backend: str) -> AsyncIterator[DifyChatEngine]:
    _, url = dify_host
    engine = DifyChatEngine(
        base_url=f"{url}/v1", api_key=API_KEY, read_timeout=5, idle_timeout=5, total_timeout=10
    )
    try:
        yield engine
    finally:
        await engine.aclose()


def request_problems(request: RecordedRequest) -> list[str]:
    """How a request the local server received breaks Dify's published request schema."""
    operation = OPERATIONS.get((request.method, request.path)) or next(
        (
            op
            for (method, path), op in TEMPLATED_OPERATIONS.items()
            if method == request.method and path.fullmatch(request.path)
        ),
        None,
    )
    if operation is None:
        return [] if request.path.startswith("/files/tools/") else [f"unknown operation {request.path}"]
    schema = dify_schemas()["requests"][operation]
    if "body" not in schema:
        return (
            [] if request.json is None and not request.form else [f"{operation}: a body where none is taken"]
        )
    if schema["content_type"] == "multipart/form-data":
        fields = {p.name: (p.text if p.filename is None else "<binary>") for p in request.form}
        return problems(schema["body"], fields)
    if request.headers.get("content-type", "").split(";")[0] != "application/json":
        return [f"{operation}: not sent as JSON"]
    return problems(schema["body"], request.json)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Every event of an SSE body; a ping (an `event: ping` line, no data) becomes {"event": "ping"}."""
    events: list[dict[str, Any]] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = block.split(b"\n")
        data = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if data:
            events.append(json.loads(b"\n".join(data)))
        elif b"event: ping" in lines:
            events.append({"event": "ping"})
    return events


def event_problems(event: Mapping[str, Any]) -> list[str]:
    schemas = dify_schemas()["events"]
    name = event.get("event")
    if name == "ping":
        return []  # no data at all on the wire
    if name not in schemas:
        return [f"unknown event {name!r}"]
    return problems(schemas[name], event, str(name))


class TestTheSchemaDocument:
    def test_it_names_its_source_dify_version_and_date(self) -> None:
        document = dify_schemas()

        assert "dify-docs" in document["source"]
        assert document["dify_version"] == "1.16"
        assert len(document["generated"]) == 10 and document["generated"][4] == "-"
        assert EXPECTED_EVENTS - {"ping"} <= set(document["events"]) | {"ping"}

    def test_it_holds_structure_only(self) -> None:
        def keys(node: Any, inside_properties: bool = False) -> Iterator[str]:
            if isinstance(node, dict):
                for key, value in node.items():
                    if not inside_properties:
                        yield key
                    yield from keys(value, key == "properties" and not inside_properties)
            elif isinstance(node, list):
                for item in node:
                    yield from keys(item)

        found = set(keys({k: dify_schemas()[k] for k in ("requests", "responses", "events")}))

        assert not found & PROSE
        assert "$ref" not in found and "nullable" not in found

    def test_the_script_reduces_refs_inheritance_and_nullable(self) -> None:
        ref = {"$ref": "#/components/schemas/Req"}
        operation = {"requestBody": {"content": {"application/json": {"schema": ref}}}}
        endpoints = [
            ("post", "/chat-messages", "200"),
            ("post", "/files/upload", "201"),
            ("post", "/audio-to-text", "200"),
            ("get", "/parameters", "200"),
            ("get", "/info", "200"),
            ("post", "/messages/{message_id}/feedbacks", "200"),
            ("get", "/messages/{message_id}/suggested", "200"),
            ("post", "/conversations/{conversation_id}/name", "200"),
        ]
        paths = {p: {m: {**operation, "responses": {s: {"content": {}}}}} for m, p, s in endpoints}
        event_enum = {"event": {"type": "string", "enum": ["message", "ping"]}}
        mapping = {"message": "#/components/schemas/Msg"}
        answer = {"type": "object", "properties": {"answer": {"type": "string", "description": "d"}}}
        schemas = {
            "Req": {
                "type": "object",
                "description": "prose",
                "required": ["q"],
                "properties": {"q": {"type": "string", "example": "x", "nullable": True}},
            },
            "ChunkChatEvent": {
                "type": "object",
                "properties": event_enum,
                "discriminator": {"propertyName": "event", "mapping": mapping},
            },
            "Base": {"type": "object", "properties": {"task_id": {"type": "string", "format": "uuid"}}},
            "Msg": {
                "allOf": [
                    {"$ref": "#/components/schemas/ChunkChatEvent"},
                    {"$ref": "#/components/schemas/Base"},
                    answer,
                ]
            },
        }
        document = {"paths": paths, "components": {"schemas": schemas}}

        reduced = build(document, source="test@1", dify_version="9.9", date="2026-01-01")

        assert reduced["requests"]["POST /chat-messages"]["body"] == {
            "type": "object",
            "required": ["q"],
            "properties": {"q": {"type": ["string", "null"]}},
        }
        assert reduced["events"]["message"] == {
            "type": "object",
            "required": ["event"],
            "properties": {
                "event": {"type": "string", "enum": ["message"]},
                "task_id": {"type": "string", "format": "uuid"},
                "answer": {"type": "string"},
            },
        }
        assert (reduced["source"], reduced["dify_version"], reduced["generated"]) == (
            "test@1",
            "9.9",
            "2026-01-01",
        )

    def test_the_committed_document_is_what_the_script_writes(self) -> None:
        # Formatting is the script's: re-serialising the committed data gives the committed bytes.
        text = SCHEMAS_PATH.read_text(encoding="utf-8")

        assert text == json.dumps(json.loads(text), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
        assert Path(__file__).resolve().parents[2].joinpath("scripts", "dify_schemas.py").is_file()


class TestWhatTheAdapterSends:
    async def test_every_kind_of_request_conforms(self, dify: FakeDifyServer, engine: DifyChatEngine) -> None:
        await engine.info()
        await engine.parameters()
        image = await engine.upload_file("wm-alice", "photo.png", "image/png", media_samples.png())
        await engine.transcribe("wm-alice", silent_wav(0.3), "audio/wav")
        first = await engine.ask(
            Question(
                user="wm-alice",
                query="看看这张图",
                inputs={"channel": "wecom"},
                files=(Attachment("image", image.id),),
                trace_id="msg-1",
            )
        )
        await engine.ask(Question(user="wm-alice", query="再问", conversation_id=first.conversation_id))
        dify.mode = "agent-chat"
        blocking = DifyChatEngine(base_url=str(engine._base_url), api_key=API_KEY, response_mode="blocking")
        try:
            await blocking.ask(Question(user="wm-bob", query="你好"))  # refused blocking, then streaming
        finally:
            await blocking.aclose()

        seen = {(r.method, r.path) for r in dify.requests}
        assert set(OPERATIONS) <= seen
        assert [(r.path, request_problems(r)) for r in dify.requests if request_problems(r)] == []
        assert dify.schema_violations == []

    def test_every_request_of_this_session_conforms(self) -> None:
        # Every request the adapter made to any local Dify server so far in this session (the adapter
        # contract suite, the test above, ...). Requests tests craft by hand to probe Dify's own validation
        # are not the adapter's: it always identifies itself as kf-dify.
        adapters = [r for r in SESSION_REQUESTS if r.headers.get("user-agent") == "kf-dify"]

        assert adapters
        assert [(r.method, r.path, request_problems(r)) for r in adapters if request_problems(r)] == []

    async def test_the_local_server_refuses_what_breaks_the_schema(
        self, dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer
    ) -> None:
        _, url = dify_host
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{url}/v1/chat-messages",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"inputs": {}, "query": "你好", "user": "wm-x", "auto_generate_name": "yes"},
            )

        assert response.status_code == 400
        assert response.json()["code"] == "invalid_param"
        assert dify.schema_violations and "auto_generate_name" in dify.schema_violations[0][1][0]


class TestWhatTheDoublesSendBack:
    @pytest.mark.parametrize("scenario", sorted(STREAMS))
    async def test_the_local_servers_streams_conform(
        self, dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer, scenario: str
    ) -> None:
        events = await self._stream(dify_host, dify, scenario)

        assert events
        assert {e["event"] for e in events} & {"message_end", "workflow_paused", "error"}
        broken = [(e["event"], event_problems(e)) for e in events if event_problems(e)]
        if scenario == "unknown-event-and-pings":
            assert broken == [("quantum_entanglement", ["unknown event 'quantum_entanglement'"])]
        else:
            assert broken == []

    async def test_the_streams_show_every_event_of_the_issue(
        self, dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer
    ) -> None:
        seen: set[str] = set()
        for scenario in STREAMS:
            host, _ = dify_host
            host.server = dify = FakeDifyServer(api_key=API_KEY, ping_interval=0.05, hang_limit=5)
            seen |= {e["event"] for e in await self._stream(dify_host, dify, scenario)}

        assert EXPECTED_EVENTS - seen == set()

    async def test_the_benchmarks_fake_difys_stream_conforms(self, anyio_backend: str) -> None:
        with serve(FakeDify()) as url:
            async with httpx.AsyncClient() as client:
                response = await client.post(
                    f"{url}/v1/chat-messages",
                    json={"inputs": {}, "query": "你好", "user": "u", "response_mode": "streaming"},
                )

        events = sse_events(response.content)
        assert [e["event"] for e in events][-1] == "message_end"
        assert [(e["event"], event_problems(e)) for e in events if event_problems(e)] == []

    async def test_the_local_servers_answers_and_errors_conform(
        self, dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer
    ) -> None:
        _, url = dify_host
        responses = dify_schemas()["responses"]
        auth = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=f"{url}/v1", headers=auth) as client:
            answers = {
                "GET /info 200": await client.get("/info"),
                "GET /parameters 200": await client.get("/parameters"),
                "POST /files/upload 201": await client.post(
                    "/files/upload",
                    files={"file": ("a.png", media_samples.png(), "image/png")},
                    data={"user": "u"},
                ),
                "POST /audio-to-text 200": await client.post(
                    "/audio-to-text",
                    files={"file": ("v.wav", silent_wav(0.2), "audio/wav")},
                    data={"user": "u"},
                ),
                "POST /chat-messages 200": await client.post(
                    "/chat-messages",
                    json={"inputs": {}, "query": "你好", "user": "u", "response_mode": "blocking"},
                ),
            }
            dify.mode = "agent"
            big, user = b"\0" * (11 * 1024 * 1024), {"user": "u"}
            errors = [
                await client.post("/chat-messages", json={"inputs": {}, "query": "你好", "user": "u"}),
                await client.post("/files/upload", files={"file": ("big.png", big, "image/png")}, data=user),
                await client.post("/files/upload", files={"file": ("a.png", b"x", "")}, data={"user": "u"}),
            ]  # fmt: skip

        for operation, response in answers.items():
            assert response.is_success, (operation, response.text)
            schema = responses[operation]["application/json"]
            assert (operation, problems(schema, response.json())) == (operation, [])
        assert [e.status_code for e in errors] == [400, 413, 415]
        assert errors[1].json()["message"] == ""  # Dify's 413 says nothing (docs/dify.md)
        for error in errors:
            assert problems(dify_schemas()["error_envelope"], error.json()) == []

    @staticmethod
    async def _stream(
        dify_host: tuple[FakeDifyHost, str], dify: FakeDifyServer, scenario: str
    ) -> list[dict[str, Any]]:
        _, url = dify_host
        mode, fault = STREAMS[scenario]
        dify.mode = mode
        dify.inject(fault)
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{url}/v1/chat-messages",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={
                    "inputs": {},
                    "query": "保修期多久？",
                    "user": "wm-alice",
                    "response_mode": "streaming",
                },
                timeout=10,
            )
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.content)
