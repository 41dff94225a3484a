"""The admin API gives nothing without the token, proven over its own OpenAPI document.

Requests are generated from /openapi.json (hypothesis over the schema: parameters and JSON bodies that follow
it, and ones that do not) for every operation carrying the bearer security scheme, with every wrong way of
authenticating: no header, a wrong token, "Bearer" without a value, another scheme, the right token under
another scheme (each request from an address of its own: see the lockout in tests/e2e/test_admin_api.py).
Each answer is 401 (403 while ADMIN_TOKEN is not configured) with the fixed JSON error and
nothing else: no conversation id, no user, no counter, and no side effect. With the right token, generated
input never causes a 5xx.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.routing import Route

from adapters.inbound.openapi import ADMIN_SECURITY, openapi_document
from bootstrap import VERSION
from tests.reliability.hostile_input import KF, InProcess, fuzz, in_process, notice_xml, signed_callback

pytestmark = pytest.mark.anyio

RIGHT = "unit-admin-token-0123456789"
CUSTOMER = "wmLeakCanary0001"
DOCUMENT = openapi_document(version=VERSION)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]

    @property
    def admin(self) -> bool:
        return any(ADMIN_SECURITY in requirement for requirement in self.spec.get("security", []))


OPERATIONS = [
    Operation(method.upper(), path, spec)
    for path, item in DOCUMENT["paths"].items()
    for method, spec in item.items()
]
ADMIN_OPERATIONS = [op for op in OPERATIONS if op.admin]


# --- strategies from the schema -----------------------------------------------------------------------------


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = DOCUMENT["components"]["schemas"][name]
    return schema


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)


def interesting_strings(name: str) -> st.SearchStrategy[str]:
    # The seeded customer and kf account too: even the right user id must not open anything without the token.
    known = {"user_id": [CUSTOMER, " " + CUSTOMER + " "], "open_kfid": [KF]}.get(name, [])
    return st.sampled_from(known) if known else st.nothing()


def from_schema(schema: dict[str, Any], name: str = "") -> st.SearchStrategy[Any]:
    schema = resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        text = st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
        return text | interesting_strings(name)
    if kind == "integer":
        return st.integers()
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=3)
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, k) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, k) for k, v in properties.items() if k not in required},
        )
    return ANY_JSON


@dataclass(frozen=True)
class Generated:
    operation: Operation
    params: list[tuple[str, str]]
    body: bytes | None


@st.composite
def requests_for(draw: st.DrawFn, operations: list[Operation]) -> Generated:
    operation = draw(st.sampled_from(operations))
    params: list[tuple[str, str]] = []
    for parameter in operation.spec.get("parameters", []):
        if parameter["in"] != "query":
            continue
        # Usually present and well-formed; sometimes missing, or any text.
        choice = draw(st.sampled_from(["schema", "schema", "missing", "text"]))
        if choice == "schema":
            params.append((parameter["name"], draw(from_schema(parameter["schema"], parameter["name"]))))
        elif choice == "text":
            params.append((parameter["name"], draw(st.text(max_size=30))))
    params += draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=2))
    body: bytes | None = None
    content = operation.spec.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        body = draw(
            st.one_of(
                from_schema(schema).map(lambda v: json.dumps(v).encode()),
                ANY_JSON.map(lambda v: json.dumps(v).encode()),
                st.binary(max_size=200),
                st.just(b""),
            )
        )
    elif draw(st.booleans()):
        body = draw(st.binary(max_size=100))  # a body nobody asked for
    return Generated(operation, params, body)


HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=40)
wrong_tokens = st.one_of(
    HEADER_TEXT.filter(lambda t: t.strip() != RIGHT),
    st.sampled_from(
        [RIGHT[:-1], RIGHT + "x", RIGHT.upper(), "x" + RIGHT, RIGHT[1:], RIGHT.replace("-", "_")]
    ),
)
WRONG_AUTH: st.SearchStrategy[list[tuple[str, str]]] = st.one_of(
    st.just([]),
    wrong_tokens.map(lambda t: [("Authorization", f"Bearer {t}")]),
    st.sampled_from(["Bearer", "Bearer ", "bearer", "Bearer    ", "", " "]).map(
        lambda h: [("Authorization", h)]
    ),
    st.sampled_from(["Basic", "Token", "Digest", "Bearer2", "Bearerx", "JWT", "OAuth"]).map(
        lambda scheme: [("Authorization", f"{scheme} {RIGHT}")]
    ),
    st.just([("Authorization", RIGHT)]),  # the right token without a scheme
    st.just([("Authorization", f"Bearer\t{RIGHT}")]),  # not a space: not the bearer scheme
    wrong_tokens.map(lambda t: [("Authorization", f"Bearer {t}"), ("Authorization", f"Bearer {RIGHT}")]),
    st.just([("X-Admin-Token", RIGHT), ("Cookie", f"token={RIGHT}")]),  # the token, but not where it counts
    st.just([("Authorization", f"Bearer {RIGHT}".encode().decode("latin-1").replace("-", "\u2010"))]),
)


def leaks(text: str, conversation_id: str) -> list[str]:
    markers = [conversation_id, CUSTOMER, KF, "counters", "conversation_id", "known_kfs", "uptime", "cleared"]
    return [m for m in markers if m and m in text]


# --- the app ----------------------------------------------------------------------------------------------


_ADDRESSES = itertools.count(1)


@dataclass
class Seeded:
    app: InProcess
    conversation_id: str

    async def send(
        self, generated: Generated, headers: list[tuple[str, str]], method: str | None = None
    ) -> httpx.Response:
        """One generated request, each from an address of its own: repeated failures from one address are
        locked out (429, tests/e2e/test_admin_api.py), which is not what these tests are about."""
        encoded = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers]
        async with self.new_address() as client:
            return await client.request(
                method or generated.operation.method,
                generated.operation.path,
                params=tuple(generated.params),
                content=generated.body,
                headers=httpx.Headers(encoded),
            )

    def new_address(self) -> httpx.AsyncClient:
        n = next(_ADDRESSES)
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        transport = httpx.ASGITransport(app=self.app.container.app(), client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url=self.app.client.base_url)

    async def conversation_still_there(self) -> bool:
        response = await self.app.client.get(
            "/get_conversation", params={"user_id": CUSTOMER}, headers={"Authorization": f"Bearer {RIGHT}"}
        )
        return response.status_code == 200 and response.json()["conversation_id"] == self.conversation_id


async def seeded(app: InProcess) -> Seeded:
    """One answered customer: a conversation to protect, and counters that are not zero."""
    app.world.add_customer_text(KF, CUSTOMER, "你好")
    query, body = signed_callback(notice_xml())
    assert (await app.client.post("/webhook", params=query, content=body)).status_code == 200
    await app.settle()
    lookup = await app.client.get(
        "/get_conversation", params={"user_id": CUSTOMER}, headers={"Authorization": f"Bearer {RIGHT}"}
    )
    assert lookup.status_code == 200
    return Seeded(app, lookup.json()["conversation_id"])


@pytest.fixture
async def guarded() -> AsyncIterator[Seeded]:
    async with in_process(admin_token=RIGHT) as app:
        yield await seeded(app)


@pytest.fixture
async def unconfigured() -> AsyncIterator[Seeded]:
    async with in_process(admin_token="") as app:
        app.world.add_customer_text(KF, CUSTOMER, "你好")
        query, body = signed_callback(notice_xml())
        assert (await app.client.post("/webhook", params=query, content=body)).status_code == 200
        await app.settle()
        yield Seeded(app, "")


# --- the document -----------------------------------------------------------------------------------------


async def test_the_served_document_is_the_openapi_description_of_every_route(guarded: Seeded) -> None:
    response = await guarded.app.client.get("/openapi.json")  # open: shapes only
    assert response.status_code == 200
    served = response.json()
    assert served == DOCUMENT
    assert served["openapi"].startswith("3.")
    assert served["components"]["securitySchemes"][ADMIN_SECURITY] == {
        "type": "http",
        "scheme": "bearer",
        "description": served["components"]["securitySchemes"][ADMIN_SECURITY]["description"],
    }
    routes = {
        (route.path, method)
        for route in guarded.app.container.app().routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    documented = {(op.path, op.method) for op in OPERATIONS}
    assert routes == documented
    admin_paths = {op.path for op in ADMIN_OPERATIONS}
    assert admin_paths == {
        "/status", "/clear", "/get_conversation", "/reset_conversation", "/metrics",
        # the operator console's (adapters/inbound/console_api.py)
        "/admin/overview", "/admin/customers", "/admin/customers/{open_kfid}/{external_userid}",
        "/admin/problems", "/admin/try", "/admin/try/reset",
    }  # fmt: skip
    for op in OPERATIONS:
        assert op.spec["responses"], op
        if op.admin:
            assert {"401", "403"} <= set(op.spec["responses"]), op
    # No configured value found its way into the document.
    for secret in guarded.app.container.settings().secrets():
        assert secret not in response.text


async def test_open_operations_need_no_token_and_admin_ones_do(guarded: Seeded) -> None:
    for op in OPERATIONS:
        async with guarded.new_address() as client:
            response = await client.request(op.method, op.path)
        assert (response.status_code == 401) == op.admin, (op.method, op.path, response.status_code)


# --- without the token ------------------------------------------------------------------------------------


@fuzz(60)
@given(generated=requests_for(ADMIN_OPERATIONS), auth=WRONG_AUTH, head=st.booleans())
async def test_admin_operations_refuse_every_wrong_authentication(
    guarded: Seeded, generated: Generated, auth: list[tuple[str, str]], head: bool
) -> None:
    method = "HEAD" if head and generated.operation.method == "GET" else None
    response = await guarded.send(generated, auth, method)
    assert response.status_code == 401, (generated, auth, response.text)
    assert response.headers["www-authenticate"] == "Bearer"
    if method == "HEAD":
        assert response.content == b""
    else:
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"error": "unauthorized: send Authorization: Bearer <ADMIN_TOKEN>"}
        assert leaks(response.text, guarded.conversation_id) == []
    if generated.operation.path in ("/clear", "/reset_conversation"):
        assert await guarded.conversation_still_there()


@fuzz(25)
@given(
    generated=requests_for(ADMIN_OPERATIONS),
    auth=WRONG_AUTH
    | st.just([("Authorization", f"Bearer {RIGHT}")])
    | st.just([("Authorization", "Bearer ")]),
)
async def test_admin_operations_refuse_everyone_while_no_token_is_configured(
    unconfigured: Seeded, generated: Generated, auth: list[tuple[str, str]]
) -> None:
    response = await unconfigured.send(generated, auth)
    assert response.status_code == 403, (generated, auth, response.text)
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"] and "ADMIN_TOKEN" in response.json()["error"]
    assert leaks(response.text, "") == []


# --- with the right token ---------------------------------------------------------------------------------


@fuzz(35)
@given(
    generated=requests_for(ADMIN_OPERATIONS),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER"]),
    padding=st.sampled_from(["", " ", "  "]),
)
async def test_admin_operations_with_the_token_never_fail_on_generated_input(
    guarded: Seeded, generated: Generated, scheme: str, padding: str
) -> None:
    response = await guarded.send(generated, [("Authorization", f"{scheme} {padding}{RIGHT}{padding}")])
    assert response.status_code < 500, (generated, response.text)
    assert response.status_code != 401
    if generated.operation.path == "/metrics":
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str)
    # Whatever was asked, no configured value comes back.
    for secret in guarded.app.container.settings().secrets():
        assert secret not in response.text
