"""Property tests: whatever arrives, the crypto succeeds or raises CallbackRejected, never anything else.

KF_FUZZ_EXAMPLES raises the example count for a longer local run (e.g. KF_FUZZ_EXAMPLES=20000).
"""

from __future__ import annotations

import base64
import os
import struct
from xml.sax.saxutils import escape

from Crypto.Cipher import AES
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.inbound.wecom_crypto import CallbackRejected, WeComCrypto, parse_notice
from domain.messages import CallbackNotice

TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
RECEIVE_ID = "ww1436e0e65a779aee"
AES_KEY = base64.b64decode(KEY + "=")
CRYPTO = WeComCrypto(token=TOKEN, encoding_aes_key=KEY, receive_id=RECEIVE_ID)

# database=None: no .hypothesis/ directory in the repo; deadline=None: AES timing varies on shared CI runners.
FUZZ = settings(max_examples=int(os.environ.get("KF_FUZZ_EXAMPLES", "200")), deadline=None, database=None)

params = st.text(max_size=64)
identifiers = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), max_size=40)


def outcome_of_get(encrypted: str, **overrides: str) -> str | CallbackRejected:
    query = {"timestamp": "1700000000", "nonce": "1", "echostr": encrypted}
    query["msg_signature"] = CRYPTO.signature(query["timestamp"], query["nonce"], encrypted)
    query.update(overrides)
    try:
        return CRYPTO.verify_url(**query)
    except CallbackRejected as rejection:
        return rejection


def outcome_of_post(body: bytes, *, msg_signature: str, timestamp: str, nonce: str) -> str | CallbackRejected:
    try:
        return CRYPTO.decrypt_callback(
            msg_signature=msg_signature, timestamp=timestamp, nonce=nonce, body=body
        )
    except CallbackRejected as rejection:
        return rejection


@FUZZ
@given(body=st.binary(max_size=2048), msg_signature=params, timestamp=params, nonce=params)
def test_arbitrary_post_bodies_are_refused_cleanly(
    body: bytes, msg_signature: str, timestamp: str, nonce: str
) -> None:
    assert isinstance(
        outcome_of_post(body, msg_signature=msg_signature, timestamp=timestamp, nonce=nonce), CallbackRejected
    )


@FUZZ
@given(encrypt=st.text(max_size=512), timestamp=params, nonce=params)
def test_signed_envelopes_around_arbitrary_text_only_succeed_or_are_refused(
    encrypt: str, timestamp: str, nonce: str
) -> None:
    body = f"<xml><Encrypt>{escape(encrypt)}</Encrypt></xml>".encode("utf-8", "surrogatepass")
    outcome = outcome_of_post(
        body, msg_signature=CRYPTO.signature(timestamp, nonce, encrypt), timestamp=timestamp, nonce=nonce
    )
    assert isinstance(outcome, str | CallbackRejected)


@FUZZ
@given(msg_signature=params, timestamp=params, nonce=params, echostr=st.text(max_size=256))
def test_arbitrary_get_parameters_are_refused_cleanly(
    msg_signature: str, timestamp: str, nonce: str, echostr: str
) -> None:
    try:
        CRYPTO.verify_url(msg_signature=msg_signature, timestamp=timestamp, nonce=nonce, echostr=echostr)
    except CallbackRejected:
        return
    raise AssertionError("an unsigned GET was accepted")


@FUZZ
@given(echostr=st.text(max_size=256))
def test_signed_arbitrary_echostr_only_succeeds_or_is_refused(echostr: str) -> None:
    assert isinstance(outcome_of_get(echostr), str | CallbackRejected)


@FUZZ
@given(ciphertext=st.binary(max_size=512) | st.binary(min_size=1, max_size=24).map(lambda b: b * 16))
def test_signed_arbitrary_ciphertext_only_succeeds_or_is_refused(ciphertext: bytes) -> None:
    assert isinstance(outcome_of_get(base64.b64encode(ciphertext).decode()), str | CallbackRejected)


@FUZZ
@given(plaintext=st.binary(max_size=200).map(lambda b: b + b"\x00" * (-len(b) % 16)))
def test_arbitrary_decrypted_bytes_only_succeed_or_are_refused(plaintext: bytes) -> None:
    # Encrypting raw blocks reaches the padding and layout checks, which random ciphertext rarely gets past.
    ciphertext = AES.new(AES_KEY, AES.MODE_CBC, iv=AES_KEY[:16]).encrypt(plaintext)
    assert isinstance(outcome_of_get(base64.b64encode(ciphertext).decode()), str | CallbackRejected)


@FUZZ
@given(
    msg=st.binary(max_size=100),
    msg_len=st.integers(min_value=0, max_value=2**32 - 1),
    receive_id=st.sampled_from([RECEIVE_ID.encode(), b"", b"ww", b"\xff" * 18]),
)
def test_well_padded_plaintexts_with_any_layout_only_succeed_or_are_refused(
    msg: bytes, msg_len: int, receive_id: bytes
) -> None:
    data = os.urandom(16) + struct.pack(">I", msg_len) + msg + receive_id
    pad = 32 - len(data) % 32
    ciphertext = AES.new(AES_KEY, AES.MODE_CBC, iv=AES_KEY[:16]).encrypt(data + bytes([pad]) * pad)
    outcome = outcome_of_get(base64.b64encode(ciphertext).decode())
    honest = msg_len == len(msg) and receive_id == RECEIVE_ID.encode()
    if isinstance(outcome, str):
        assert outcome.encode("utf-8") == msg[:msg_len]
    else:
        assert not honest or outcome.code == -40008  # only invalid UTF-8 may refuse an honest layout


@FUZZ
@given(plaintext=st.text(max_size=300), timestamp=st.text(max_size=16), nonce=st.text(max_size=16))
def test_anything_we_encrypt_decrypts_to_itself(plaintext: str, timestamp: str, nonce: str) -> None:
    body, signature = CRYPTO.encrypt_callback(plaintext, timestamp=timestamp, nonce=nonce)
    assert (
        CRYPTO.decrypt_callback(msg_signature=signature, timestamp=timestamp, nonce=nonce, body=body)
        == plaintext
    )


@FUZZ
@given(xml=st.text(max_size=512) | st.binary(max_size=512).map(lambda b: b.decode("latin-1")))
def test_parse_notice_on_arbitrary_text_returns_a_notice_or_refuses(xml: str) -> None:
    try:
        assert isinstance(parse_notice(xml), CallbackNotice)
    except CallbackRejected as rejection:
        assert rejection.code == -40002


@FUZZ
@given(
    event=identifiers,
    token=identifiers,
    open_kfid=identifiers,
    create_time=st.integers(min_value=0, max_value=2**40),
    order=st.permutations(range(4)),
    cdata=st.booleans(),
)
def test_parse_notice_reads_fields_in_any_order(
    event: str, token: str, open_kfid: str, create_time: int, order: list[int], cdata: bool
) -> None:
    def wrap(value: str) -> str:
        return f"<![CDATA[{value}]]>" if cdata else value

    fields = [
        f"<Event>{wrap(event)}</Event>",
        f"<Token>{wrap(token)}</Token>",
        f"<OpenKfId>{wrap(open_kfid)}</OpenKfId>",
        f"<CreateTime>{create_time}</CreateTime>",
    ]
    xml = "<xml>\n" + "\n".join(fields[i] for i in order) + "\n<MsgType>event</MsgType></xml>"
    assert parse_notice(xml) == CallbackNotice(
        event=event or "event", token=token, open_kfid=open_kfid, create_time=create_time
    )


# --- the flat-document fast path reads exactly what the XML parser reads -----------------------------------


def parser_fields(document: str) -> dict[str, str] | None:
    """The reference: defusedxml's reading of the root's children (first occurrence wins), None if refused."""
    from defusedxml.ElementTree import fromstring

    try:
        root = fromstring(document, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except Exception:
        return None
    fields: dict[str, str] = {}
    for child in root:
        fields.setdefault(child.tag, child.text or "")
    return fields


tags = st.sampled_from(["Encrypt", "ToUserName", "Token", "a", "_x1", "OpenKfId"])
# Characters around the edges of the grammar (CDATA terminators, CJK), and now and then one the fast path must
# leave to the parser: markup, an entity, CR (XML rewrites CRLF), a forbidden control character.
tricky = st.text(alphabet=st.sampled_from(list("ab]>[中=+/ \n\t") * 6 + list("<&\r\x01\x0b")), max_size=10)
contents = st.one_of(
    tricky.map(lambda t: f"<![CDATA[{t}]]>"),
    tricky,
    st.tuples(tricky, tricky).map(lambda p: f"{p[0]}<![CDATA[{p[1]}]]>"),
)
children = st.tuples(st.sampled_from(["", " ", "\n", "\t", "\r\n"]), tags, contents, tags).map(
    # mostly well-formed (same closing tag), sometimes mismatched
    lambda c: f"{c[0]}<{c[1]}>{c[2]}</{c[1] if c[3] != '_x1' else c[3]}>"
)
documents = st.tuples(
    st.sampled_from(["", " ", "\n"]), st.lists(children, max_size=5), st.sampled_from(["", "\n", "x"])
).map(lambda d: f"{d[0]}<xml>{''.join(d[1])}</xml>{d[2]}")


@FUZZ
@given(document=documents)
def test_the_fast_path_reads_flat_documents_as_the_parser_does(document: str) -> None:
    from adapters.inbound.wecom_crypto import _flat_fields

    fast = _flat_fields(document)
    if fast is not None:
        assert fast == parser_fields(document)
        assert _flat_fields(document.encode("utf-8")) == fast


@FUZZ
@given(document=st.text(max_size=300))
def test_the_fast_path_accepts_nothing_the_parser_refuses(document: str) -> None:
    from adapters.inbound.wecom_crypto import _flat_fields

    fast = _flat_fields(document)
    if fast is not None:
        assert fast == parser_fields(document)


def test_the_fast_path_takes_what_wecom_sends() -> None:
    from adapters.inbound.wecom_crypto import _flat_fields

    body, _ = CRYPTO.encrypt_callback("<xml></xml>", timestamp="1", nonce="2")
    fields = _flat_fields(body)
    assert fields is not None and set(fields) == {"ToUserName", "Encrypt", "AgentID"}
    assert fields == parser_fields(body.decode())
