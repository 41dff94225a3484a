"""Building blocks of the OpenAPI document (openapi.py): responses, parameters, and how admin and open
operations are marked."""

from __future__ import annotations

from typing import Any, Final

ADMIN_SECURITY: Final = "bearerAuth"

JSON = "application/json"
TEXT = "text/plain"


def error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def text_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {TEXT: {"schema": {"type": "string"}}}}


def json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def query_param(name: str, description: str, *, required: bool) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


_ADMIN_REFUSALS: Final = {
    "401": {
        **error_response("Missing or wrong bearer token"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    },
    "403": error_response("ADMIN_TOKEN is not configured: the admin API refuses every request"),
    "429": {
        **error_response("Too many failed attempts from this address: locked out for a while"),
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}},
    },
}


def admin_operation(operation: dict[str, Any]) -> dict[str, Any]:
    return {
        **operation,
        "tags": ["admin"],
        "security": [{ADMIN_SECURITY: []}],
        "responses": {**operation["responses"], **_ADMIN_REFUSALS},
    }


def open_operation(operation: dict[str, Any], tag: str) -> dict[str, Any]:
    return {**operation, "tags": [tag], "security": []}


def path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def html_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def object_schema(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}
