"""A small JSON Schema checker for docs/dify-schemas.json (what scripts/dify_schemas.py emits).

It knows exactly the keywords the reducer keeps: type (one or a list), properties, required, enum, const,
items, additionalProperties, allOf/anyOf/oneOf, maxLength, pattern and the `uuid` format; any other keyword
makes it fail loudly rather than pass silently. Written here instead of depending on `jsonschema` because
the subset is this small and the test doubles use it at request time.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

SCHEMAS_PATH = Path(__file__).resolve().parents[2] / "docs" / "dify-schemas.json"
_KNOWN = frozenset(
    {"type", "properties", "required", "enum", "const", "items", "additionalProperties", "allOf", "anyOf"}
    | {"oneOf", "maxLength", "pattern", "format"}
)
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


@cache
def dify_schemas() -> Mapping[str, Any]:
    loaded: Mapping[str, Any] = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    return loaded


def problems(schema: Mapping[str, Any], value: Any, where: str = "$") -> list[str]:
    """Every way `value` breaks `schema`, as "path: reason" lines; empty when it conforms."""
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"{where}: schema keywords this checker does not know: {sorted(unknown)}")
    found: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not any(_is(value, k) for k in kinds):
            return [f"{where}: expected {'/'.join(kinds)}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: expected {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{where}: does not match {schema['pattern']}")
        if schema.get("format") == "uuid" and not _is_uuid(value):
            found.append(f"{where}: {value!r} is not a UUID")
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{where}: missing {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                found += problems(properties[name], item, f"{where}.{name}")
            elif extra is False:
                found.append(f"{where}: unexpected {name!r}")
            elif isinstance(extra, Mapping):
                found += problems(extra, item, f"{where}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            found += problems(schema["items"], item, f"{where}[{index}]")
    for part in schema.get("allOf", []):
        found += problems(part, value, where)
    for keyword, wanted in (("anyOf", None), ("oneOf", 1)):
        if keyword in schema:
            passing = sum(not problems(part, value, where) for part in schema[keyword])
            if passing == 0 or (wanted is not None and passing != wanted):
                found.append(f"{where}: matches {passing} of {keyword}")
    return found


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
