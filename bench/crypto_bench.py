"""Callback crypto and parsing, in-process: kf-dify's verify+decrypt+parse next to raw AES-CBC on the same
bytes.

    python -m bench.crypto_bench --seconds 0.5 --rounds 3

Rows (ops/s, best of the alternated rounds):
- full: WeComCrypto.decrypt_callback (envelope XML, SHA-1 signature, base64, AES-CBC, padding and receive id
  checks) + parse_notice (inner XML) on distinct valid callbacks;
- raw_aes: pycryptodome AES-256-CBC decrypt of the same ciphertexts (already base64-decoded);
- the steps of `full` on their own, to show where its time goes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
import xml.etree.ElementTree as StdET
from collections.abc import Callable
from typing import Any

from Crypto.Cipher import AES
from defusedxml.ElementTree import fromstring as defused_fromstring

from adapters.inbound.wecom_crypto import _flat_fields, parse_notice
from bench.common import AES_KEY, KF, TOKEN
from bench.rawhttp import crypto, notice_xml


def _rate(fn: Callable[[int], None], n: int, seconds: float) -> float:
    """Calls of fn(i) per second over about `seconds` (whole passes over the n inputs)."""
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for i in range(n):
            fn(i)
        done += n
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - started)


def run(seconds: float, rounds: int, size: int = 1000) -> dict[str, Any]:
    c = crypto()
    key = base64.b64decode(AES_KEY + "=")  # the 32-byte AES key, as WeComCrypto derives it
    iv = key[:16]
    callbacks: list[tuple[str, str, str, bytes]] = []
    for i in range(size):
        ts, nonce = str(1_700_000_000 + i), f"c{i}"
        body, sig = c.encrypt_callback(
            notice_xml(KF, f"TOK{i}", 1_700_000_000 + i), timestamp=ts, nonce=nonce
        )
        callbacks.append((sig, ts, nonce, body))
    encrypted = [defused_fromstring(b[3]).findtext("Encrypt") or "" for b in callbacks]
    ciphertexts = [base64.b64decode(e) for e in encrypted]
    inner = [c.decrypt_callback(msg_signature=s, timestamp=t, nonce=n, body=b) for s, t, n, b in callbacks]

    def full(i: int) -> None:
        s, t, n, b = callbacks[i]
        parse_notice(c.decrypt_callback(msg_signature=s, timestamp=t, nonce=n, body=b))

    def raw_aes(i: int) -> None:
        AES.new(key, AES.MODE_CBC, iv=iv).decrypt(ciphertexts[i])

    def envelope_fast(i: int) -> None:
        _flat_fields(callbacks[i][3])

    def envelope_xml(i: int) -> None:
        defused_fromstring(callbacks[i][3], forbid_dtd=True, forbid_entities=True, forbid_external=True)

    def envelope_xml_stdlib(i: int) -> None:
        StdET.fromstring(callbacks[i][3])

    def signature(i: int) -> None:
        s, t, n, _ = callbacks[i]
        parts = sorted([TOKEN, t, n, encrypted[i]])
        hashlib.sha1("".join(parts).encode()).hexdigest()

    def b64(i: int) -> None:
        base64.b64decode(encrypted[i], validate=True)

    def notice(i: int) -> None:
        parse_notice(inner[i])

    steps: dict[str, Callable[[int], None]] = {
        "full": full,
        "raw_aes": raw_aes,
        "step_envelope_fast": envelope_fast,
        "step_envelope_xml_defusedxml": envelope_xml,
        "step_envelope_xml_stdlib": envelope_xml_stdlib,
        "step_signature_sha1": signature,
        "step_base64": b64,
        "step_parse_notice": notice,
    }
    best: dict[str, float] = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        # Alternate: every row is measured in every round, so drift hits all of them alike.
        for name, fn in steps.items():
            best[name] = max(best[name], _rate(fn, size, seconds))
    return {
        "ops_per_s": best,
        "us_per_op": {k: 1e6 / v for k, v in best.items()},
        "ratio_full_to_raw": best["full"] / best["raw_aes"],
        "bytes": {"body": len(callbacks[0][3]), "ciphertext": len(ciphertexts[0])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crypto_bench")
    parser.add_argument("--seconds", type=float, default=0.5, help="per row per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    json.dump(run(args.seconds, args.rounds), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
