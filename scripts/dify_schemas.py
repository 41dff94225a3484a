"""Reduce Dify's published OpenAPI document to the structure of what kf-dify sends and reads.

    python scripts/dify_schemas.py OPENAPI.json --source REPO@COMMIT --dify-version 1.16 \
        -o docs/dify-schemas.json

Keeps, for the endpoints the Dify adapter calls, the request bodies (JSON and multipart form fields) and the
answers it reads, and every `/chat-messages` stream event, each with every `$ref` inlined, `allOf` merged and
OpenAPI's `nullable` turned into a JSON Schema type list. Prose (description, summary, example, title, ...)
and keywords the contract test does not check are dropped, so the output changes only when the structure does.
The contract test tests/contract/test_dify_conformance.py validates the adapter's requests and the test
doubles' streams against the result (see docs/dify.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Mapping
from typing import Any

# (method, path) → what the adapter sends: a JSON body, form fields, or query parameters only.
REQUESTS = (
    ("post", "/chat-messages"),
    ("post", "/messages/{message_id}/feedbacks"),
    ("post", "/conversations/{conversation_id}/name"),
    ("post", "/files/upload"),
    ("post", "/audio-to-text"),
    ("get", "/parameters"),
    ("get", "/info"),
    ("get", "/messages/{message_id}/suggested"),
)
# Success answers the adapter reads (by status code).
RESPONSES = (
    ("post", "/chat-messages", "200"),
    ("post", "/files/upload", "201"),
    ("post", "/audio-to-text", "200"),
    ("get", "/parameters", "200"),
    ("get", "/info", "200"),
    ("get", "/messages/{message_id}/suggested", "200"),
)
# The schema whose discriminator lists every event of a chat app's stream.
EVENT_ROOT = "ChunkChatEvent"
# Structural keywords kept; everything else (prose, examples, formats of no consequence) is dropped.
KEPT = frozenset(
    {"type", "properties", "required", "enum", "items", "additionalProperties", "allOf", "anyOf", "oneOf"}
    | {"maxLength", "pattern", "const", "format"}
)


class Reducer:
    def __init__(self, document: Mapping[str, Any]) -> None:
        self._schemas: Mapping[str, Any] = document.get("components", {}).get("schemas", {})

    def reduce(self, schema: Any, seen: tuple[str, ...] = ()) -> Any:
        if not isinstance(schema, Mapping):
            return schema
        ref = schema.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name in seen:  # a recursive schema: stop at any object
                return {"type": "object"}
            return self.reduce(self._schemas[name], (*seen, name))
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key not in KEPT:
                continue
            if key == "properties":
                out[key] = {name: self.reduce(sub, seen) for name, sub in value.items()}
            elif key in ("items", "additionalProperties"):
                out[key] = self.reduce(value, seen) if isinstance(value, Mapping) else value
            elif key in ("allOf", "anyOf", "oneOf"):
                out[key] = [self.reduce(sub, seen) for sub in value]
            else:
                out[key] = value
        if "allOf" in out:
            out = _merge_all_of(out)
        if schema.get("nullable") is True:
            out = _nullable(out)
        return out


def _merge_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    """Fold `allOf` parts into one object schema (what OpenAPI's inheritance means); a later part's
    property refines an earlier one of the same name."""
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        part = _merge_all_of(part) if "allOf" in part else part
        for key, value in part.items():
            if key == "properties":
                merged.setdefault("properties", {}).update(value)
            elif key == "required":
                merged["required"] = sorted({*merged.get("required", []), *value})
            else:
                merged.setdefault(key, value)
    return merged


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        schema = {**schema, "type": [kind, "null"]}
    elif kind is None and "enum" not in schema:
        return schema  # untyped: null is already allowed
    if "enum" in schema and None not in schema["enum"]:
        schema = {**schema, "enum": [*schema["enum"], None]}
    return schema


def _body_schema(operation: Mapping[str, Any]) -> tuple[str, Any] | None:
    content = operation.get("requestBody", {}).get("content", {})
    for media_type in ("application/json", "multipart/form-data"):
        if media_type in content:
            return media_type, content[media_type].get("schema", {})
    return None


def build(document: Mapping[str, Any], *, source: str, dify_version: str, date: str) -> dict[str, Any]:
    reducer = Reducer(document)
    paths = document["paths"]
    requests: dict[str, Any] = {}
    for method, path in REQUESTS:
        operation = paths[path][method]
        entry: dict[str, Any] = {}
        body = _body_schema(operation)
        if body is not None:
            entry["content_type"], entry["body"] = body[0], reducer.reduce(body[1])
        query = [p for p in operation.get("parameters", []) if p.get("in") == "query"]
        if query:
            entry["query"] = {
                "type": "object",
                "properties": {p["name"]: reducer.reduce(p.get("schema", {})) for p in query},
                "required": sorted(p["name"] for p in query if p.get("required")),
            }
        requests[f"{method.upper()} {path}"] = entry
    responses: dict[str, Any] = {}
    for method, path, status in RESPONSES:
        content = paths[path][method]["responses"][status].get("content", {})
        responses[f"{method.upper()} {path} {status}"] = {
            media_type: reducer.reduce(body["schema"])
            for media_type, body in sorted(content.items())
            if media_type == "application/json" and "schema" in body
        }
    root = document["components"]["schemas"][EVENT_ROOT]
    events: dict[str, Any] = {}
    for name, ref in sorted(root["discriminator"]["mapping"].items()):
        schema = reducer.reduce({"$ref": ref})
        # The shared base lists every event name; each event's own schema allows only its own.
        schema.setdefault("properties", {})["event"] = {"type": "string", "enum": [name]}
        schema["required"] = sorted({*schema.get("required", []), "event"})
        events[name] = schema
    error = document["paths"]["/chat-messages"]["post"]["responses"]
    envelope_keys = sorted(
        {
            key
            for status, answer in error.items()
            if status != "200"
            for example in answer.get("content", {}).get("application/json", {}).get("examples", {}).values()
            for key in example.get("value", {})
        }
    )
    return {
        "source": source,
        "dify_version": dify_version,
        "generated": date,
        "generator": "scripts/dify_schemas.py",
        "requests": requests,
        "responses": responses,
        "error_envelope": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "status": {"type": "integer"},
            },
            "required": envelope_keys,
        },
        "events": events,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("openapi", help="path of Dify's OpenAPI document (JSON)")
    parser.add_argument("--source", required=True, help="where the document comes from (repository@commit)")
    parser.add_argument("--dify-version", required=True, help="the Dify version the document describes")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="date noted in the output")
    parser.add_argument("-o", "--output", help="write here instead of standard output")
    args = parser.parse_args(argv)
    with open(args.openapi, encoding="utf-8") as file:
        document = json.load(file)
    result = build(document, source=args.source, dify_version=args.dify_version, date=args.date)
    text = json.dumps(result, ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
