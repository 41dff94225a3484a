"""WeCom callback crypto against the official vectors (docs/wecom-kf.md §2) and every way a callback can be
malformed."""

from __future__ import annotations

import base64
import struct
from urllib.parse import parse_qs

import pytest
from Crypto.Cipher import AES

from adapters.inbound.wecom_crypto import (
    MAX_BODY_BYTES,
    CallbackRejected,
    WeComCrypto,
    parse_notice,
)
from domain.messages import CallbackNotice

# Vector A: Tencent's official Python sample (sbzhu/weworkapi_python callback/Sample.py).
A_TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
A_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
A_RECEIVE_ID = "ww1436e0e65a779aee"
A_AES_KEY = bytes.fromhex("eaa91d32babaf274ca76ece72583b5037ed6da8120a64314be4b6d453a2a854b")

A1_SIGNATURE = "012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb"
A1_TIMESTAMP = "1476416373"
A1_NONCE = "47744683"
A1_ECHOSTR = "fsi1xnbH4yQh0+PJxcOdhhK6TDXkjMyhEPA7xB2TGz6b+g7xyAbEkRxN/3cNXW9qdqjnoVzEtpbhnFyq6SVHyA=="

A2_SIGNATURE = "0c3914025cb4b4d68103f6bfc8db550f79dcf48e"
A2_TIMESTAMP = "1476422779"
A2_NONCE = "1597212914"
A2_ENCRYPT = (
    "Kl7kjoSf6DMD1zh7rtrHjFaDapSCkaOnwu3bqLc5tAybhhMl9pFeK8NslNPVdMwmBQTNoW4mY7AIjeLvEl3NyeTkAgGzBhzTtRLNshw2AEew"
    "+kkYcD+Fq72Kt00fT0WnN87hGrW8SqGc+NcT3mu87Ha3dz1pSDi6GaUA6A0sqfde0VJPQbZ9U+3JWcoD4Z5jaU0y9GSh010wsHF8KZD24Yhm"
    "ZH4ch4Ka7ilEbjbfvhKkNL65HHL0J6EYJIZUC2pFrdkJ7MhmEbU2qARR4iQHE7wy24qy0cRX3Mfp6iELcDNfSsPGjUQVDGxQDCWjayJOpcwo"
    "cugux082f49HKYg84EpHSGXAyh+/oxwaWbvL6aSDPOYuPDGOCI8jmnKiypE+"
)
A2_PLAINTEXT = (
    "<xml><ToUserName>ww1436e0e65a779aee</ToUserName><FromUserName>ChenJiaShun</FromUserName>"
    "<CreateTime>1476422779</CreateTime><MsgType>text</MsgType><Content>你好</Content>"
    "<MsgId>1456453720</MsgId><AgentID>1000002</AgentID></xml>"
)

# Vector B: Tencent's 2014 sample / 加解密方案说明 举例说明 (QDG6eK set).
B_TOKEN = "QDG6eK"
B_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
B_RECEIVE_ID = "wx5823bf96d3bd56c7"

B1_SIGNATURE = "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3"
B1_TIMESTAMP = "1409659589"
B1_NONCE = "263014780"
B1_ECHOSTR = "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ=="
B1_ECHOSTR_URL_ENCODED = (
    "P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO%2BFZXvnaqQ%3D%3D"
)

B2_SIGNATURE = "477715d11cdb4164915debcba66cb864d751f3e6"
B2_TIMESTAMP = "1409659813"
B2_NONCE = "1372623149"
B2_ENCRYPT = (
    "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvu"
    "JTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwG"
    "c2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9"
    "EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0"
    "lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q=="
)
B2_PLAINTEXT = "\n".join(
    [
        "<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName>",
        "<FromUserName><![CDATA[mycreate]]></FromUserName>",
        "<CreateTime>1409659813</CreateTime>",
        "<MsgType><![CDATA[text]]></MsgType>",
        "<Content><![CDATA[hello]]></Content>",
        "<MsgId>4561255354251345929</MsgId>",
        "<AgentID>218</AgentID>",
        "</xml>",
    ]
)

# Vector C: wechatpy tests/test_crypto.py.
C_TOKEN = "123456"
C_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
C_RECEIVE_ID = "wx49f0ab532d5d035a"

C1_SIGNATURE = "dd6b9c95b495b3f7e2901bfbc76c664930ffdb96"
C1_TIMESTAMP = "1411443780"
C1_NONCE = "437374425"
C1_ECHOSTR = "4ByGGj+sVCYcvGeQYhaKIk1o0pQRNbRjxybjTGblXrBaXlTXeOo1+bXFXDQQb1o6co6Yh9Bv41n7hOchLF6p+Q=="

C2_SIGNATURE = "74d92dfeb87ba7c714f89d98870ae5eb62dff26d"
C2_TIMESTAMP = "1411525903"
C2_NONCE = "461056294"
C2_ENCRYPT = (
    "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTyeDXzF6Bv283dGymz"
    "xh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYyolBug/gYNx410cvkKR2/nPwBiT+P4hIi"
    "OAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNdshoQgWYEvc"
    "cTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdCRxthuL0="
)
C2_PLAINTEXT = "\n".join(
    [
        "<xml><ToUserName><![CDATA[wx49f0ab532d5d035a]]></ToUserName>",
        "<FromUserName><![CDATA[messense]]></FromUserName>",
        "<CreateTime>1411525903</CreateTime>",
        "<MsgType><![CDATA[text]]></MsgType>",
        "<Content><![CDATA[test]]></Content>",
        "<MsgId>4363689963896700987</MsgId>",
        "<AgentID>1</AgentID>",
        "</xml>",
    ]
)

C3_PLAINTEXT = "\n".join(
    [
        "<xml>",
        "<MsgType><![CDATA[text]]></MsgType>",
        "<Content><![CDATA[test]]></Content>",
        "<FromUserName><![CDATA[wx49f0ab532d5d035a]]></FromUserName>",
        "<ToUserName><![CDATA[messense]]></ToUserName>",
        "<AgentID>1</AgentID>",
        "<CreateTime>1411525903</CreateTime>",
        "</xml>",
    ]
)
C3_ENCRYPT = (
    "9s4gMv99m88kKTh/H8IdkOiMg6bisoy3ypwy9H4hvSPe9nsGaqyw5hhSjdYbcrKk+j3nba4HMOTzHrluLBYqxgNcBqGsL8GqxlhZgURnAtOb"
    "vesEl5nZ+uBE8bviY0LWke8Zy9V/QYKxNV2FqllNXcfmstttyIkMKCCmVbCFM2JTF5wY0nFhHZSjPUL2Q1qvSUCUld+/WIXrx0oyKQmpB6o8"
    "NRrrNrsDf03oxI1p9FxUgMnwKKZeOA/uu+2IEvEBtb7muXsVbwbgX05UPPJvFurDXafG0RQyPR+mf1nDnAtQmmNOuiR5MIkdQ39xn1vWwi1O"
    "5oazPoQJz0nTYjxxEE8kv3kFxtAGVRe3ypD3WeK2XeFYFMNMpatF9XiKzHo3"
)
C3_SIGNATURE = "407518b7649e86ef23978113f92d27afa9296533"

# Vector D: a kf notice under vector A's credentials (docs/wecom-kf.md §2, derived, cross-checked with
# wechatpy).
D_TIMESTAMP = "1700000000"
D_NONCE = "1234567"
D_PLAINTEXT = (
    "<xml><ToUserName><![CDATA[ww1436e0e65a779aee]]></ToUserName><CreateTime>1700000000</CreateTime>"
    "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
    "<Token><![CDATA[ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR]]></Token>"
    "<OpenKfId><![CDATA[wkxxxxxxx]]></OpenKfId></xml>"
)
D_ENCRYPT = (
    "/K4xJYsBwQssQzE/v2nbvNRGin0OyAA6MkWjUGiopbeRNNhIuYTA29yvRHVLhhz6mKTVTohFWCIJzzQv/nULiqzckt9zjfsPtSxbO4kDQjHS"
    "bHwXesjb3qh7aNwAC6jzRsdXm/qc62m+ujBX0vPFD4mePP5/RKVwDipJc05jk0QA6AD9tH8s8NjRSvXFtgi3P6yYtj7EkH5df+WUzabYa6t+"
    "EJoLhokr6fWFOJ0SB5nwIkRY9IxtCWGkbkQRY7Q8Ec70RbtBh76MNQlPQBq0F4+EmZKDPgCEKc3ytRIv9Jq54Gp6/x2iEB52rPAqIJRNSbrS"
    "eXkRKTq8mTWk7BbWUodrfckq6Aw5q0emg6gAzQSQiGmk9/dXx0LGRif82gHxbdjy9oHCAGnIYQNIMiShy0pE21GDqrikeiJAL6xorZUoXsgo"
    "ZxM91vRebf5QDI6nm+2v3qfwGhS+pxuC9jLUtA=="
)
D_SIGNATURE = "2ac648c9e453d488ada5f6dfe5d851ed39bd38fe"

FIXED_PREFIX = b"1234567890123456"


def crypto_a(receive_id: str = A_RECEIVE_ID) -> WeComCrypto:
    return WeComCrypto(token=A_TOKEN, encoding_aes_key=A_KEY, receive_id=receive_id)


def crypto_b() -> WeComCrypto:
    return WeComCrypto(token=B_TOKEN, encoding_aes_key=B_KEY, receive_id=B_RECEIVE_ID)


def crypto_c() -> WeComCrypto:
    return WeComCrypto(token=C_TOKEN, encoding_aes_key=C_KEY, receive_id=C_RECEIVE_ID)


def envelope(encrypt: str, *, to_user: str, agent_id: str, sep: str = "") -> bytes:
    return sep.join(
        [
            f"<xml><ToUserName><![CDATA[{to_user}]]></ToUserName>",
            f"<Encrypt><![CDATA[{encrypt}]]></Encrypt>",
            f"<AgentID><![CDATA[{agent_id}]]></AgentID>",
            "</xml>",
        ]
    ).encode("utf-8")


def raw_encrypt(plaintext: bytes) -> str:
    """AES-CBC under vector A's key with no padding added: lets a test shape every byte of the plaintext."""
    return base64.b64encode(AES.new(A_AES_KEY, AES.MODE_CBC, iv=A_AES_KEY[:16]).encrypt(plaintext)).decode()


def raw_decrypt(encrypted: str) -> bytes:
    return AES.new(A_AES_KEY, AES.MODE_CBC, iv=A_AES_KEY[:16]).decrypt(base64.b64decode(encrypted))


def pkcs7_32(data: bytes) -> bytes:
    pad = 32 - len(data) % 32
    return data + bytes([pad]) * pad


def layout(msg: bytes, *, receive_id: bytes = A_RECEIVE_ID.encode(), msg_len: int | None = None) -> bytes:
    length = len(msg) if msg_len is None else msg_len
    return FIXED_PREFIX + struct.pack(">I", length) + msg + receive_id


def rejection_of_signed_get(encrypted: str, crypto: WeComCrypto | None = None) -> CallbackRejected:
    """Signs `encrypted` correctly so the refusal comes from what follows the signature check."""
    crypto = crypto or crypto_a()
    with pytest.raises(CallbackRejected) as caught:
        crypto.verify_url(
            msg_signature=crypto.signature("1", "2", encrypted), timestamp="1", nonce="2", echostr=encrypted
        )
    return caught.value


def rejection_of_post(body: bytes, *, msg_signature: str = "0" * 40) -> CallbackRejected:
    with pytest.raises(CallbackRejected) as caught:
        crypto_a().decrypt_callback(msg_signature=msg_signature, timestamp="1", nonce="2", body=body)
    return caught.value


class TestOfficialVectors:
    def test_a1_get_verification_echoes_the_decrypted_msg(self) -> None:
        assert (
            crypto_a().verify_url(
                msg_signature=A1_SIGNATURE, timestamp=A1_TIMESTAMP, nonce=A1_NONCE, echostr=A1_ECHOSTR
            )
            == "1288432023552776189"
        )

    def test_a2_post_decrypts_to_the_exact_plaintext(self) -> None:
        body = envelope(A2_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="1000002", sep="\n")
        plaintext = crypto_a().decrypt_callback(
            msg_signature=A2_SIGNATURE, timestamp=A2_TIMESTAMP, nonce=A2_NONCE, body=body
        )
        assert plaintext == A2_PLAINTEXT
        assert len(plaintext.encode("utf-8")) == 228

    def test_a_trap_get_from_the_b_key_set_is_refused_under_a_credentials(self) -> None:
        crypto = crypto_a()
        assert (
            crypto.signature(B1_TIMESTAMP, B1_NONCE, B1_ECHOSTR) == "0a0e97529eaef1b21bb08d9355da85e8dc08c2e1"
        )
        with pytest.raises(CallbackRejected) as caught:
            crypto.verify_url(
                msg_signature=B1_SIGNATURE, timestamp=B1_TIMESTAMP, nonce=B1_NONCE, echostr=B1_ECHOSTR
            )
        assert caught.value.code == -40001

    def test_b1_get_verification_with_the_url_encoded_echostr_decoded(self) -> None:
        query = (
            f"msg_signature={B1_SIGNATURE}&timestamp={B1_TIMESTAMP}&nonce={B1_NONCE}"
            f"&echostr={B1_ECHOSTR_URL_ENCODED}"
        )
        params = {name: values[0] for name, values in parse_qs(query, strict_parsing=True).items()}
        assert params["echostr"] == B1_ECHOSTR
        assert crypto_b().verify_url(**params) == "1616140317555161061"

    def test_b1_get_verification_survives_a_plus_decoded_as_space(self) -> None:
        mangled = B1_ECHOSTR.replace("+", " ")
        assert mangled != B1_ECHOSTR
        assert (
            crypto_b().verify_url(
                msg_signature=B1_SIGNATURE, timestamp=B1_TIMESTAMP, nonce=B1_NONCE, echostr=mangled
            )
            == "1616140317555161061"
        )

    def test_b_official_signature_example(self) -> None:
        assert crypto_b().signature(B2_TIMESTAMP, B2_NONCE, B2_ENCRYPT) == B2_SIGNATURE

    def test_b2_post_decrypts_to_the_exact_plaintext(self) -> None:
        body = envelope(B2_ENCRYPT, to_user=B_RECEIVE_ID, agent_id="218")
        plaintext = crypto_b().decrypt_callback(
            msg_signature=B2_SIGNATURE, timestamp=B2_TIMESTAMP, nonce=B2_NONCE, body=body
        )
        assert plaintext == B2_PLAINTEXT
        assert len(plaintext.encode("utf-8")) == 284

    def test_c1_get_verification(self) -> None:
        assert (
            crypto_c().verify_url(
                msg_signature=C1_SIGNATURE, timestamp=C1_TIMESTAMP, nonce=C1_NONCE, echostr=C1_ECHOSTR
            )
            == "5927782489442352469"
        )

    def test_c1_neg_get_with_a_changed_nonce_is_a_signature_error(self) -> None:
        crypto = crypto_c()
        assert (
            crypto.signature(C1_TIMESTAMP, "437374424", C1_ECHOSTR)
            == "f89767f6fd40774771fe6c17908dc7ec82313f9a"
        )
        with pytest.raises(CallbackRejected) as caught:
            crypto.verify_url(
                msg_signature=C1_SIGNATURE, timestamp=C1_TIMESTAMP, nonce="437374424", echostr=C1_ECHOSTR
            )
        assert caught.value.code == -40001

    def test_c2_post_with_a_single_padding_byte(self) -> None:
        body = envelope(C2_ENCRYPT, to_user=C_RECEIVE_ID, agent_id="1")
        plaintext = crypto_c().decrypt_callback(
            msg_signature=C2_SIGNATURE, timestamp=C2_TIMESTAMP, nonce=C2_NONCE, body=body
        )
        assert plaintext == C2_PLAINTEXT
        assert len(plaintext.encode("utf-8")) == 281

    def test_c3_encryption_with_a_fixed_prefix_is_deterministic(self) -> None:
        crypto = crypto_c()
        encrypted = crypto.encrypt(C3_PLAINTEXT, random_prefix=FIXED_PREFIX)
        assert encrypted == C3_ENCRYPT
        assert crypto.signature(C2_TIMESTAMP, C2_NONCE, encrypted) == C3_SIGNATURE

    def test_c3_forged_callback_carries_the_same_encrypt_and_signature(self) -> None:
        crypto = crypto_c()
        body, signature = crypto.encrypt_callback(
            C3_PLAINTEXT, timestamp=C2_TIMESTAMP, nonce=C2_NONCE, random_prefix=FIXED_PREFIX
        )
        assert f"<Encrypt><![CDATA[{C3_ENCRYPT}]]></Encrypt>".encode() in body
        assert signature == C3_SIGNATURE
        assert (
            crypto.decrypt_callback(
                msg_signature=signature, timestamp=C2_TIMESTAMP, nonce=C2_NONCE, body=body
            )
            == C3_PLAINTEXT
        )

    def test_d_kf_notice_encrypts_to_the_exact_envelope_and_signature(self) -> None:
        body, signature = crypto_a().encrypt_callback(
            D_PLAINTEXT, timestamp=D_TIMESTAMP, nonce=D_NONCE, random_prefix=FIXED_PREFIX
        )
        assert body == envelope(D_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="")
        assert signature == D_SIGNATURE

    def test_d_kf_notice_decrypts_and_parses(self) -> None:
        body = envelope(D_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="")
        plaintext = crypto_a().decrypt_callback(
            msg_signature=D_SIGNATURE, timestamp=D_TIMESTAMP, nonce=D_NONCE, body=body
        )
        assert plaintext == D_PLAINTEXT
        assert parse_notice(plaintext) == CallbackNotice(
            event="kf_msg_or_event",
            token="ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR",
            open_kfid="wkxxxxxxx",
            create_time=1700000000,
        )


class TestRoundTrip:
    @pytest.mark.parametrize(
        "plaintext",
        ["", "1288432023552776189", "你好，客服", "<xml><Content><![CDATA[🙂 ok]]></Content></xml>"],
        ids=["empty", "ascii", "cjk", "xml-with-emoji"],
    )
    def test_encrypted_text_decrypts_to_itself(self, plaintext: str) -> None:
        crypto = crypto_a()
        body, signature = crypto.encrypt_callback(plaintext, timestamp="1700000000", nonce="42")
        assert crypto.decrypt_callback(
            msg_signature=signature, timestamp="1700000000", nonce="42", body=body
        ) == (plaintext)

    def test_every_padding_length_from_1_to_32_round_trips(self) -> None:
        crypto = crypto_a()
        pads = set()
        for length in range(71):
            plaintext = "x" * length
            encrypted = crypto.encrypt(plaintext)
            pads.add(raw_decrypt(encrypted)[-1])
            signature = crypto.signature("1", "2", encrypted)
            assert (
                crypto.verify_url(msg_signature=signature, timestamp="1", nonce="2", echostr=encrypted)
                == plaintext
            )
        assert pads == set(range(1, 33))

    def test_an_empty_receive_id_round_trips(self) -> None:
        crypto = crypto_a(receive_id="")
        encrypted = crypto.encrypt("hello")
        signature = crypto.signature("1", "2", encrypted)
        assert (
            crypto.verify_url(msg_signature=signature, timestamp="1", nonce="2", echostr=encrypted) == "hello"
        )

    def test_random_prefixes_differ_between_encryptions(self) -> None:
        crypto = crypto_a()
        assert crypto.encrypt("same") != crypto.encrypt("same")

    def test_a_random_prefix_of_the_wrong_size_is_a_programming_error(self) -> None:
        with pytest.raises(ValueError):
            crypto_a().encrypt("x", random_prefix=b"short")


class TestRejections:
    def test_a_wrong_signature_is_refused(self) -> None:
        with pytest.raises(CallbackRejected) as caught:
            crypto_a().verify_url(
                msg_signature=A1_SIGNATURE[:-1] + "0",
                timestamp=A1_TIMESTAMP,
                nonce=A1_NONCE,
                echostr=A1_ECHOSTR,
            )
        assert (caught.value.code, caught.value.reason) == (-40001, "signature mismatch")

    def test_an_uppercase_or_non_ascii_signature_is_refused_not_crashed(self) -> None:
        for signature in (A1_SIGNATURE.upper(), "签名", ""):
            with pytest.raises(CallbackRejected) as caught:
                crypto_a().verify_url(
                    msg_signature=signature, timestamp=A1_TIMESTAMP, nonce=A1_NONCE, echostr=A1_ECHOSTR
                )
            assert caught.value.code == -40001

    def test_a_post_with_a_wrong_signature_is_refused(self) -> None:
        body = envelope(A2_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="1000002")
        with pytest.raises(CallbackRejected) as caught:
            crypto_a().decrypt_callback(
                msg_signature=A2_SIGNATURE, timestamp=A2_TIMESTAMP, nonce="1", body=body
            )
        assert caught.value.code == -40001

    def test_a_different_receive_id_is_refused(self) -> None:
        crypto = crypto_a(receive_id="ww0000000000000000")
        with pytest.raises(CallbackRejected) as caught:
            crypto.verify_url(
                msg_signature=A1_SIGNATURE, timestamp=A1_TIMESTAMP, nonce=A1_NONCE, echostr=A1_ECHOSTR
            )
        assert (caught.value.code, caught.value.reason) == (-40005, "receive id mismatch")

    def test_a_receive_id_that_is_a_prefix_of_the_real_one_is_refused(self) -> None:
        assert (
            rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"m", receive_id=b"ww1436")))).code == -40005
        )

    def test_a_receive_id_that_is_not_utf8_is_refused(self) -> None:
        assert (
            rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"m", receive_id=b"\xff\xfe")))).code
            == -40005
        )

    @pytest.mark.parametrize(
        "encrypted",
        ["not base64!", "abc", "AAAA AAAA", "AA==AA==", "Ωmega==", "AAAA\n"],
        ids=["alphabet", "padding", "space", "data-after-padding", "non-ascii", "newline"],
    )
    def test_broken_base64_is_refused(self, encrypted: str) -> None:
        rejection = rejection_of_signed_get(encrypted)
        assert (rejection.code, rejection.reason) == (-40010, "bad base64")

    @pytest.mark.parametrize(
        "ciphertext", [b"", b"\x00" * 15, b"\x00" * 33], ids=["empty", "short-block", "not-a-multiple-of-16"]
    )
    def test_a_ciphertext_of_impossible_length_is_refused(self, ciphertext: bytes) -> None:
        assert rejection_of_signed_get(base64.b64encode(ciphertext).decode()).code == -40007

    def test_a_truncated_ciphertext_is_refused(self) -> None:
        ciphertext = base64.b64decode(A1_ECHOSTR)
        for cut in (ciphertext[:-1], ciphertext[:-16], ciphertext[:16]):
            rejection = rejection_of_signed_get(base64.b64encode(cut).decode())
            assert rejection.code in (-40007, -40008)

    @pytest.mark.parametrize(
        "tail",
        [b"\x00", b"\x21", b"\xff", b"\x01\x02\x03" + b"\x05" * 4],
        ids=["zero", "thirty-three", "ff", "inconsistent"],
    )
    def test_bad_padding_is_refused(self, tail: bytes) -> None:
        data = layout(b"1288432023552776189")
        data += b"\x00" * (-(len(data) + len(tail)) % 32) + tail
        rejection = rejection_of_signed_get(raw_encrypt(data))
        assert (rejection.code, rejection.reason) == (-40007, "bad padding")

    def test_padding_longer_than_the_plaintext_cannot_slice_past_the_start(self) -> None:
        rejection = rejection_of_signed_get(raw_encrypt(b"\x20" * 16))
        assert rejection.code == -40007

    def test_a_plaintext_shorter_than_the_header_is_refused(self) -> None:
        rejection = rejection_of_signed_get(raw_encrypt(pkcs7_32(FIXED_PREFIX + b"\x00\x00")))
        assert (rejection.code, rejection.reason) == (-40008, "plaintext too short")

    @pytest.mark.parametrize("msg_len", [21, 1000, 2**32 - 1])
    def test_a_msg_len_longer_than_the_plaintext_is_refused(self, msg_len: int) -> None:
        rejection = rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"hi", msg_len=msg_len))))
        assert rejection.code == -40008

    def test_a_msg_len_shorter_than_the_message_leaves_a_receive_id_mismatch(self) -> None:
        rejection = rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"hello", msg_len=2))))
        assert rejection.code == -40005

    def test_a_message_that_is_not_utf8_is_refused(self) -> None:
        rejection = rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"\xc3\x28"))))
        assert (rejection.code, rejection.reason) == (-40008, "message is not UTF-8")

    def test_an_envelope_with_a_dtd_is_refused(self) -> None:
        body = b"<!DOCTYPE xml [<!ELEMENT xml ANY>]><xml><Encrypt><![CDATA[x]]></Encrypt></xml>"
        assert rejection_of_post(body).code == -40002

    def test_a_billion_laughs_envelope_is_refused(self) -> None:
        entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
        dtd = f'<!DOCTYPE xml [<!ENTITY l0 "lol">{entities}]>'
        body = f'<?xml version="1.0"?>{dtd}<xml><Encrypt>&l9;</Encrypt></xml>'
        assert rejection_of_post(body.encode()).code == -40002

    def test_an_external_entity_envelope_is_refused(self) -> None:
        body = b'<!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]><xml><Encrypt>&x;</Encrypt></xml>'
        assert rejection_of_post(body).code == -40002

    @pytest.mark.parametrize(
        "body",
        [
            b"",
            b"not xml",
            b'{"Encrypt": "x"}',
            b"<xml><Encrypt>",
            b"\xff\xfe\x00<",
            b'<?xml version="1.0" encoding="nope"?><xml/>',
        ],
        ids=["empty", "text", "json", "unclosed", "binary", "unknown-encoding"],
    )
    def test_a_body_that_is_not_xml_is_refused(self, body: bytes) -> None:
        assert rejection_of_post(body).code == -40002

    @pytest.mark.parametrize(
        "body",
        [
            b"<xml><ToUserName>ww</ToUserName></xml>",
            b"<xml><Encrypt></Encrypt></xml>",
            b"<xml><a><Encrypt>x</Encrypt></a></xml>",
        ],
        ids=["absent", "empty", "nested"],
    )
    def test_an_envelope_without_encrypt_is_refused(self, body: bytes) -> None:
        assert rejection_of_post(body).code == -40002

    def test_an_oversized_body_is_refused_before_parsing(self) -> None:
        body = envelope(A2_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="1000002")
        body += b" " * (MAX_BODY_BYTES + 1 - len(body))
        rejection = rejection_of_post(body, msg_signature=A2_SIGNATURE)
        assert (rejection.code, rejection.reason) == (-40002, "body too large")

    def test_a_body_of_exactly_the_limit_is_accepted(self) -> None:
        body = envelope(A2_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="1000002")
        body += b" " * (MAX_BODY_BYTES - len(body))
        assert (
            crypto_a().decrypt_callback(
                msg_signature=A2_SIGNATURE, timestamp=A2_TIMESTAMP, nonce=A2_NONCE, body=body
            )
            == A2_PLAINTEXT
        )

    def test_refusals_never_mention_the_credentials_or_the_plaintext(self) -> None:
        rejections = [
            rejection_of_signed_get("not base64!"),
            rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"secret-msg", receive_id=b"other")))),
            rejection_of_signed_get(raw_encrypt(pkcs7_32(layout(b"secret-msg", msg_len=999)))),
            rejection_of_post(b"<xml><Encrypt>secret-msg</Encrypt>"),
            rejection_of_post(envelope(A2_ENCRYPT, to_user=A_RECEIVE_ID, agent_id="")),
        ]
        for rejection in rejections:
            text = f"{rejection} {rejection!r}"
            for secret in (A_TOKEN, A_KEY, A_AES_KEY.hex(), "secret-msg"):
                assert secret not in text

    def test_str_of_a_refusal_is_its_reason_and_code(self) -> None:
        assert str(CallbackRejected(-40001, "signature mismatch")) == "signature mismatch (-40001)"


class TestParseNotice:
    def test_the_official_kf_example(self) -> None:
        xml = (
            "<xml><ToUserName><![CDATA[ww12345678910]]></ToUserName><CreateTime>1348831860</CreateTime>"
            "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
            "<Token><![CDATA[ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR]]></Token>"
            "<OpenKfId><![CDATA[wkxxxxxxx]]></OpenKfId></xml>"
        )
        assert parse_notice(xml) == CallbackNotice(
            event="kf_msg_or_event",
            token="ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR",
            open_kfid="wkxxxxxxx",
            create_time=1348831860,
        )

    def test_order_whitespace_and_plain_text_values_do_not_matter(self) -> None:
        xml = """<?xml version="1.0" encoding="UTF-8"?>
        <xml>
            <OpenKfId>wk123</OpenKfId>
            <Token>
                tok
            </Token>
            <Event>kf_msg_or_event</Event>
            <CreateTime> 1700000001 </CreateTime>
            <MsgType>event</MsgType>
        </xml>
        """
        assert parse_notice(xml) == CallbackNotice(
            event="kf_msg_or_event", token="tok", open_kfid="wk123", create_time=1700000001
        )

    def test_msgtype_stands_in_when_there_is_no_event(self) -> None:
        assert parse_notice(A2_PLAINTEXT) == CallbackNotice(event="text", create_time=1476422779)

    def test_missing_fields_default_to_empty(self) -> None:
        assert parse_notice("<xml/>") == CallbackNotice(event="")

    def test_an_older_notice_without_open_kfid(self) -> None:
        xml = "<xml><Event>kf_msg_or_event</Event><Token>t</Token><CreateTime>1</CreateTime></xml>"
        assert parse_notice(xml) == CallbackNotice(event="kf_msg_or_event", token="t", create_time=1)

    @pytest.mark.parametrize("value", ["abc", "-5", "1_000", "１２３", "١٢٣", "1e9", "9" * 5000, ""])
    def test_a_create_time_that_is_not_plain_digits_becomes_zero(self, value: str) -> None:
        assert parse_notice(f"<xml><Event>e</Event><CreateTime>{value}</CreateTime></xml>").create_time == 0

    def test_other_events_pass_through(self) -> None:
        xml = (
            "<xml><ToUserName><![CDATA[ww1]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>"
            "<CreateTime>1</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            "<Event><![CDATA[kf_account_auth_change]]></Event>"
            "<AuthAddOpenKfId><![CDATA[wk1]]></AuthAddOpenKfId><AuthAddOpenKfId><![CDATA[wk2]]></AuthAddOpenKfId></xml>"
        )
        assert parse_notice(xml) == CallbackNotice(event="kf_account_auth_change", create_time=1)

    @pytest.mark.parametrize(
        "xml",
        [
            "",
            "kf_msg_or_event",
            "<xml><Event>x</Event>",
            "<xml><Event>x</Evnt></xml>",
            '<!DOCTYPE xml [<!ENTITY e "kf_msg_or_event">]><xml><Event>&e;</Event></xml>',
            '<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Token>&e;</Token></xml>',
            "<xml><Event>\x00</Event></xml>",
            "<xml><Event>\ud800</Event></xml>",
        ],
        ids=["empty", "text", "unclosed", "mismatched", "entity", "external-entity", "nul", "surrogate"],
    )
    def test_malformed_or_dangerous_xml_is_refused(self, xml: str) -> None:
        with pytest.raises(CallbackRejected) as caught:
            parse_notice(xml)
        assert caught.value.code == -40002


class TestConfiguration:
    @pytest.mark.parametrize(
        "key",
        [
            A_KEY[:-1],
            A_KEY + "x",
            A_KEY[:-1] + "+",
            A_KEY[:-1] + "=",
            A_KEY[:-1] + "é",
            A_KEY[:-1] + "Ａ",
            "",
        ],
        ids=["42-chars", "44-chars", "plus", "equals", "accented", "fullwidth", "empty"],
    )
    def test_a_bad_encoding_aes_key_is_refused_without_echoing_it(self, key: str) -> None:
        with pytest.raises(ValueError) as caught:
            WeComCrypto(token=A_TOKEN, encoding_aes_key=key, receive_id=A_RECEIVE_ID)
        assert "43" in str(caught.value)
        if key:
            assert key not in str(caught.value)
            assert A_KEY[:20] not in str(caught.value)

    def test_an_empty_token_is_refused(self) -> None:
        with pytest.raises(ValueError):
            WeComCrypto(token="", encoding_aes_key=A_KEY, receive_id=A_RECEIVE_ID)

    def test_the_repr_does_not_show_the_credentials(self) -> None:
        text = repr(crypto_a())
        assert A_TOKEN not in text
        assert A_KEY not in text
