"""Hostile input at /webhook, in process: whatever arrives gets a 4xx, never a 5xx or a hang, and no work
starts (no `sync_msg`) unless the callback is genuinely valid.

"Genuinely valid" is decided by an oracle independent of the webhook: the last value of each signed query
parameter (what the framework reads), the first <Encrypt> of a DTD-free envelope, and whether that ciphertext
is one this test encrypted honestly. Budget: see tests/reliability/hostile_input.py (KF_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from adapters.inbound.wecom_crypto import MAX_BODY_BYTES
from tests.reliability.hostile_input import (
    CORP_ID,
    CRYPTO,
    KF,
    TOKEN,
    InProcess,
    RawResponse,
    call_asgi,
    encrypt_layout,
    envelope,
    fuzz,
    in_process,
    notice_xml,
    sign,
    signed_callback,
)

pytestmark = pytest.mark.anyio

TIMESTAMP, NONCE = "1700000000", "42"
VALID_PLAINTEXT = notice_xml()
VALID_ENCRYPT = CRYPTO.encrypt(VALID_PLAINTEXT, random_prefix=b"R" * 16)
VALID_QUERY = sign(VALID_ENCRYPT, timestamp=TIMESTAMP, nonce=NONCE)
VALID_BODY = envelope(VALID_ENCRYPT)


@pytest.fixture
async def app() -> AsyncIterator[InProcess]:
    async with in_process() as running:
        yield running


async def post(app: InProcess, query: bytes, body: bytes, *, method: str = "POST") -> RawResponse:
    # A hang is a failure: no single request may take seconds.
    return await asyncio.wait_for(call_asgi(app.container.app(), method=method, query=query, body=body), 5)


def encode_query(pairs: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs).encode()


async def assert_refused_without_work(app: InProcess, response: RawResponse, before: int) -> None:
    assert 400 <= response.status < 500, (response.status, response.body[:200])
    assert response.headers.get("connection") == "close"
    await app.settle()
    assert app.pulls == before, "a refused callback started a pull"


# --- the oracle ---------------------------------------------------------------------------------------------


def last_values(query: bytes) -> dict[str, str]:
    # What Starlette's QueryParams hands the endpoint: latin-1 decoded, then parse_qsl, the last value wins.
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def first_encrypt(body: bytes) -> str | None:
    from defusedxml import ElementTree

    try:
        root = ElementTree.fromstring(body, forbid_dtd=True)
    except Exception:
        return None
    return root.findtext("Encrypt")


def genuinely_valid(query: bytes, body: bytes) -> bool:
    params = last_values(query)
    if any(not params.get(name) for name in ("msg_signature", "timestamp", "nonce")):
        return False
    encrypted = first_encrypt(body)
    if encrypted != VALID_ENCRYPT or len(body) > MAX_BODY_BYTES:
        return False
    parts = sorted([TOKEN, params["timestamp"], params["nonce"], encrypted])
    expected = hashlib.sha1("".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return params["msg_signature"] == expected


# --- strategies ---------------------------------------------------------------------------------------------

PERCENT_GARBAGE = [
    "%",
    "%%",
    "%zz",
    "%G0",
    "%ff%fe",
    "%00",
    "%C3%28",
    "%ED%A0%80",
    "%E4%B8",
    "+",
    "&&",
    "=",
    ";",
]
NAMES = st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr"]) | st.text(max_size=12)
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(PERCENT_GARBAGE),
    st.integers(min_value=1_000, max_value=20_000).map(lambda n: "9" * n),  # huge
    st.just(VALID_QUERY["msg_signature"]),
    st.sampled_from([TIMESTAMP, NONCE, "", " ", "０１２", "١٧٠٠"]),
)
PAIRS = st.lists(st.tuples(NAMES, VALUES), max_size=8)
RAW_QUERY = st.one_of(
    PAIRS.map(encode_query),
    st.binary(max_size=300),  # not even percent-encoded: invalid UTF-8, control bytes, bare '%'
    st.lists(st.sampled_from(PERCENT_GARBAGE), max_size=10).map(lambda xs: "&".join(xs).encode()),
)
BODIES = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=512).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=200).map(lambda t: envelope(t)),
    st.just(VALID_BODY),
)


@fuzz(50)
@given(query=RAW_QUERY, body=BODIES, method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE"]))
async def test_arbitrary_requests_are_refused_and_start_nothing(
    app: InProcess, query: bytes, body: bytes, method: str
) -> None:
    before = app.pulls
    response = await post(app, query, body, method=method)
    if method in ("PUT", "DELETE"):
        assert response.status == 405
    else:
        await assert_refused_without_work(app, response, before)


# --- mutations of one valid callback ------------------------------------------------------------------------


@st.composite
def mutated_callbacks(draw: st.DrawFn) -> tuple[bytes, bytes]:
    pairs = list(VALID_QUERY.items())
    body = bytearray(VALID_BODY)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(
            st.sampled_from(
                ["drop", "duplicate", "replace", "junk", "garbage", "flip", "insert", "delete", "truncate"]
            )
        )
        if kind == "drop" and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif kind == "duplicate" and pairs:
            name, _ = pairs[draw(st.integers(0, len(pairs) - 1))]
            pairs.insert(draw(st.integers(0, len(pairs))), (name, draw(VALUES)))
        elif kind == "replace" and pairs:
            index = draw(st.integers(0, len(pairs) - 1))
            pairs[index] = (pairs[index][0], draw(VALUES))
        elif kind == "junk":
            pairs.insert(draw(st.integers(0, len(pairs))), (draw(NAMES), draw(VALUES)))
        elif kind == "garbage":
            pairs.append((draw(st.sampled_from(PERCENT_GARBAGE)), ""))
        elif kind == "flip" and body:
            index = draw(st.integers(0, len(body) - 1))
            body[index] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            index = draw(st.integers(0, len(body)))
            body[index:index] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and body:
            start = draw(st.integers(0, len(body) - 1))
            del body[start : start + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del body[draw(st.integers(0, len(body))) :]
    return encode_query(pairs), bytes(body)


@fuzz(70)
@given(request=mutated_callbacks())
async def test_mutated_callbacks_start_work_only_while_still_genuine(
    app: InProcess, request: tuple[bytes, bytes]
) -> None:
    query, body = request
    before = app.pulls
    response = await post(app, query, body)
    valid = genuinely_valid(query, body)
    event("still genuine" if valid else "broken")  # shown by --hypothesis-show-statistics
    if valid:
        # Only unsigned parts changed (ToUserName, AgentID, a junk parameter, a shadowed duplicate).
        assert response.status == 200 and response.body == b"success"
        await app.settle()
        assert app.pulls > before
    else:
        await assert_refused_without_work(app, response, before)


async def test_the_unmutated_callback_is_accepted_and_pulls(app: InProcess) -> None:
    # The control for the mutation test: its starting point really is valid.
    response = await post(app, encode_query(list(VALID_QUERY.items())), VALID_BODY)
    assert response.status == 200
    await app.settle()
    assert app.pulls == 1 and app.world.sync_requests[0].open_kfid == KF


# --- correctly signed envelopes around broken ciphertext --------------------------------------------------

GOOD_B64 = base64.b64encode(bytes(64)).decode()

broken_base64 = st.one_of(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", min_size=1, max_size=200
    ),
    st.text(alphabet="ABCDEFabcdef0123456789-_", min_size=1, max_size=200),  # URL-safe alphabet
    st.integers(min_value=1, max_value=len(GOOD_B64) - 1).map(lambda n: GOOD_B64[:n]),  # wrong length
    st.integers(min_value=0, max_value=5).map(lambda n: GOOD_B64.rstrip("=") + "=" * n),  # wrong '=' count
    st.integers(min_value=1, max_value=len(GOOD_B64) - 2).map(lambda n: GOOD_B64[:n] + "=" + GOOD_B64[n:]),
    st.sampled_from(
        [" " + GOOD_B64, GOOD_B64 + "\n", GOOD_B64.replace("A", "A\n", 1), "====", "é" + GOOD_B64]
    ),
)
# Decodes, but the ciphertext length is no multiple of 16, or the AES padding is wrong.
bad_ciphertext = st.one_of(
    st.binary(min_size=1, max_size=200)
    .filter(lambda b: len(b) % 16)
    .map(lambda b: base64.b64encode(b).decode()),
    st.integers(min_value=0, max_value=255)
    .filter(lambda pad: not 1 <= pad <= 32)
    .map(lambda pad: encrypt_layout(VALID_PLAINTEXT.encode(), pad=pad)),
    st.integers(min_value=1, max_value=32).map(lambda pad: encrypt_layout(b"x" * 45, pad=pad)),
)


@fuzz(30)
@given(encrypted=broken_base64 | bad_ciphertext)
async def test_signed_envelopes_around_broken_ciphertext_are_refused(app: InProcess, encrypted: str) -> None:
    before = app.pulls
    query = encode_query(list(sign(encrypted, timestamp=TIMESTAMP, nonce=NONCE).items()))
    response = await post(app, query, envelope(encrypted))
    # Even the one right pad value for "x" * 45 only gets as far as the notice parser: not XML.
    await assert_refused_without_work(app, response, before)


@fuzz(40)
@given(
    msg=st.sampled_from([VALID_PLAINTEXT.encode(), b"", b"\xff\xfe<xml/>", "<xml>中文</xml>".encode()]),
    msg_len=st.one_of(st.integers(0, 600), st.integers(0, 2**32 - 1), st.just(None)),
    receive_id=st.sampled_from(
        [
            CORP_ID.encode(),
            b"",
            b"ww",
            CORP_ID.encode() + b"x",
            b"x" + CORP_ID.encode(),
            CORP_ID.upper().encode(),
            b"wwSomeOtherCorp0001",
            b"\x00" * 14,
            CORP_ID.encode()[:-1],
        ]
    ),
)
async def test_signed_plaintexts_whose_length_or_receive_id_lie_are_refused(
    app: InProcess, msg: bytes, msg_len: int | None, receive_id: bytes
) -> None:
    before = app.pulls
    encrypted = encrypt_layout(msg, msg_len=msg_len, receive_id=receive_id)
    response = await post(app, encode_query(list(sign(encrypted).items())), envelope(encrypted))
    honest = (msg_len is None or msg_len == len(msg)) and receive_id == CORP_ID.encode()
    if honest and msg == VALID_PLAINTEXT.encode():
        assert response.status == 200
        await app.settle()
        assert app.pulls > before
    elif honest and msg == "<xml>中文</xml>".encode():
        assert response.status == 200  # genuine, well-formed, but no kf notice: acknowledged, no work
        await app.settle()
        assert app.pulls == before
    else:
        await assert_refused_without_work(app, response, before)


# --- correctly signed callbacks whose decrypted content is hostile ------------------------------------------

LISTENER = "127.0.0.1:{port}"
DEEP = 4000

# (name, inner XML, expected status). 200 only for well-formed, DTD-free XML: a genuine (signed) event we do
# not handle is acknowledged so WeCom stops retrying, and starts no work.
HOSTILE_INNER: list[tuple[str, str, int]] = [
    (
        "billion laughs",
        '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9))
        + "]><xml><Event>kf_msg_or_event</Event><OpenKfId>&j;</OpenKfId></xml>",
        400,
    ),
    (
        "quadratic blowup",
        '<!DOCTYPE xml [<!ENTITY x "' + "x" * 5000 + '">]><xml><Event>' + "&x;" * 2000 + "</Event></xml>",
        400,
    ),
    (
        "external entity file",
        '<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        "<xml><Event>kf_msg_or_event</Event><OpenKfId>&xxe;</OpenKfId></xml>",
        400,
    ),
    (
        "external entity http",
        '<!DOCTYPE xml [<!ENTITY xxe SYSTEM "http://{listener}/xxe">]>'
        "<xml><Event>kf_msg_or_event</Event><OpenKfId>&xxe;</OpenKfId></xml>",
        400,
    ),
    (
        "parameter entity",
        '<!DOCTYPE xml [<!ENTITY % p SYSTEM "http://{listener}/dtd"> %p;]><xml><Event>x</Event></xml>',
        400,
    ),
    ("external DTD", '<!DOCTYPE xml SYSTEM "http://{listener}/ext.dtd"><xml><Event>x</Event></xml>', 400),
    ("empty internal DTD", "<!DOCTYPE xml []><xml><Event>kf_msg_or_event</Event></xml>", 400),
    ("undeclared entity", "<xml><Event>&unknown;</Event></xml>", 400),
    # The decrypted notice is parsed as text: a declared encoding is moot, nothing is fetched.
    ("unknown encoding", '<?xml version="1.0" encoding="x-klingon"?><xml/>', 200),
    ("declared UTF-16, is UTF-8", '<?xml version="1.0" encoding="UTF-16"?><xml/>', 200),
    ("not XML", "hello, world", 400),
    ("JSON", '{"Event": "kf_msg_or_event", "OpenKfId": "wk"}', 400),
    ("empty", "", 400),
    ("unclosed", "<xml><Event>kf_msg_or_event</Event>", 400),
    ("two roots", "<xml/><xml/>", 400),
    ("NUL", "<xml>\x00</xml>", 400),
    ("deeply nested", "<xml>" + "<a>" * DEEP + "</a>" * DEEP + "</xml>", 200),
    ("many siblings", "<xml>" + "<a/>" * 8000 + "</xml>", 200),
    (
        "XInclude",
        '<xml xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="file:///etc/passwd"/></xml>',
        200,
    ),
    ("processing instruction", "<?xml-stylesheet href='http://{listener}/s.xsl'?><xml/>", 200),
    ("other event", notice_xml(event="enter_session"), 200),
    ("huge inner payload", "<xml><Pad>" + "x" * (MAX_BODY_BYTES * 3 // 4) + "</Pad></xml>", 413),
]


@pytest.fixture
async def listener() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP port that records anyone connecting: XML parsing must never fetch anything."""
    connections: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(await reader.read(1024))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield LISTENER.format(port=port), connections
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("name", "inner", "expected"), HOSTILE_INNER, ids=[c[0] for c in HOSTILE_INNER])
async def test_signed_callbacks_with_hostile_inner_xml(
    app: InProcess, listener: tuple[str, list[bytes]], name: str, inner: str, expected: int
) -> None:
    address, connections = listener
    query, body = signed_callback(inner.replace("{listener}", address))
    before = app.pulls
    response = await post(app, encode_query(list(query.items())), body)
    assert response.status == expected, response.body
    assert b"root:" not in response.body  # nothing from /etc/passwd
    await app.settle()
    assert app.pulls == before
    await asyncio.sleep(0.05)
    assert connections == []


HOSTILE_OUTER: list[tuple[str, bytes]] = [
    (name, inner.encode("utf-8")) for name, inner, expected in HOSTILE_INNER if expected == 400
] + [
    (
        "entity inside Encrypt",
        f'<!DOCTYPE xml [<!ENTITY e "{VALID_ENCRYPT}">]><xml><Encrypt>&e;</Encrypt></xml>'.encode(),
    ),
    (
        "external entity inside Encrypt",
        b'<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Encrypt>&e;</Encrypt></xml>',
    ),
    ("deeply nested envelope", ("<xml>" + "<a>" * DEEP + "</a>" * DEEP + "</xml>").encode()),
    ("no Encrypt", b"<xml><ToUserName>x</ToUserName></xml>"),
    ("empty Encrypt", b"<xml><Encrypt></Encrypt></xml>"),
    ("unknown envelope encoding", b'<?xml version="1.0" encoding="x-klingon"?>' + VALID_BODY),
    ("envelope declared UTF-16, is UTF-8", b'<?xml version="1.0" encoding="UTF-16"?>' + VALID_BODY),
]


@pytest.mark.parametrize(("name", "body"), HOSTILE_OUTER, ids=[c[0] for c in HOSTILE_OUTER])
async def test_hostile_outer_envelopes_are_refused(
    app: InProcess, listener: tuple[str, list[bytes]], name: str, body: bytes
) -> None:
    address, connections = listener
    body = body.replace(b"{listener}", address.encode())
    before = app.pulls
    # Signed as if its Encrypt were the valid one: the envelope itself must still be refused.
    # ("entity inside Encrypt" would expand to the valid ciphertext: refusing any DTD is what keeps it out.)
    response = await post(app, encode_query(list(VALID_QUERY.items())), body)
    await assert_refused_without_work(app, response, before)
    await asyncio.sleep(0.05)
    assert connections == []


@fuzz(30)
@given(
    inner=st.one_of(
        st.text(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    "<xml>",
                    "</xml>",
                    "<Event>",
                    "</Event>",
                    "kf_msg_or_event",
                    "<!DOCTYPE x>",
                    "<![CDATA[",
                    "]]>",
                    "&amp;",
                    "&x;",
                    "<OpenKfId>",
                    "</OpenKfId>",
                    KF,
                    "<?x?>",
                ]
            ),
            max_size=12,
        ).map("".join),
    )
)
async def test_signed_callbacks_with_arbitrary_inner_text_never_fail(app: InProcess, inner: str) -> None:
    before = app.pulls
    query, body = signed_callback(inner.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    response = await post(app, encode_query(list(query.items())), body)
    assert response.status in (200, 400), response.body
    await app.settle()
    if response.status == 400:
        assert app.pulls == before


# --- GET verification -------------------------------------------------------------------------------------


@fuzz(30)
@given(
    query=RAW_QUERY,
    echostr=st.one_of(st.text(max_size=100), broken_base64, bad_ciphertext),
    signed=st.booleans(),
)
async def test_verification_requests_echo_only_genuine_ciphertexts(
    app: InProcess, query: bytes, echostr: str, signed: bool
) -> None:
    if signed:  # correctly signed garbage: the signature passes, decryption must refuse
        params = {**sign(echostr, timestamp=TIMESTAMP, nonce=NONCE), "echostr": echostr}
        query = encode_query(list(params.items()))
    response = await post(app, query, b"", method="GET")
    if response.status == 200:
        # Only a genuinely encrypted echostr may be echoed (an AES layout that happened to be valid).
        params = last_values(query)
        assert response.body.decode() == CRYPTO.verify_url(
            msg_signature=params["msg_signature"],
            timestamp=params["timestamp"],
            nonce=params["nonce"],
            echostr=params["echostr"],
        )
    else:
        assert 400 <= response.status < 500


def huge_params() -> Iterator[tuple[str, bytes]]:
    big = "9" * 200_000
    yield "huge signature", encode_query([("msg_signature", big), ("timestamp", TIMESTAMP), ("nonce", NONCE)])
    yield "huge timestamp", encode_query([*VALID_QUERY.items(), ("timestamp", big)])
    yield (
        "thousands of params",
        encode_query([(f"p{i}", "v") for i in range(20_000)] + list(VALID_QUERY.items())[:2]),
    )
    yield "thousands of duplicates", encode_query([("nonce", str(i)) for i in range(20_000)])
    yield (
        "non-ASCII",
        encode_query([("msg_signature", "签名" * 50), ("timestamp", "时间"), ("nonce", "随机")]),
    )


@pytest.mark.parametrize(("name", "query"), list(huge_params()), ids=[n for n, _ in huge_params()])
async def test_huge_and_odd_query_strings_are_refused(app: InProcess, name: str, query: bytes) -> None:
    before = app.pulls
    response = await post(app, query, VALID_BODY)
    await assert_refused_without_work(app, response, before)
