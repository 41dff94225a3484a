"""The callback endpoint's own query-string reader agrees with Starlette's QueryParams."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from adapters.inbound.wecom_webhook import _query

names = st.sampled_from(["msg_signature", "timestamp", "nonce", "a b", "x"])
values = st.text(max_size=20)
# Raw query strings as clients really send them: escaped pairs, plus stray '&', '=', '+' and bad escapes.
raw_parts = st.one_of(
    st.tuples(names, values).map(lambda p: f"{quote(p[0])}={quote(p[1], safe='')}"),
    st.tuples(names, values).map(lambda p: f"{p[0].replace(' ', '+')}={quote(p[1], safe='+')}"),
    st.sampled_from(["", "=", "a", "a=", "=b", "%", "%zz=%e4", "+=+", "a=1=2", "%E4%B8%AD=%FF"]),
)
query_strings = st.lists(raw_parts, max_size=6).map("&".join)


@settings(max_examples=300, database=None, deadline=None)
@given(raw=query_strings)
def test_reads_query_strings_as_starlette_does(raw: str) -> None:
    encoded = raw.encode("latin-1", "ignore")
    assert _query(encoded) == dict(QueryParams(encoded.decode("latin-1")))


def test_the_last_of_repeated_names_wins() -> None:
    assert _query(b"nonce=1&nonce=2&timestamp=3") == {"nonce": "2", "timestamp": "3"}
