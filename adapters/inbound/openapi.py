"""The service's HTTP interface as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Written by hand, next to the routes in `http.py` (a test checks both list the same operations). It describes
shapes only: no configuration value, no state. Operations with `security: bearerAuth` are the admin API; the
others are open (WeCom's callback proves itself by signature, health checks need no token). /metrics needs
the admin token too.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from adapters.inbound.wecom_crypto import MAX_BODY_BYTES

__all__ = ["ADMIN_SECURITY", "openapi_document"]

ADMIN_SECURITY: Final = "bearerAuth"

_JSON = "application/json"
_TEXT = "text/plain"


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _text_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_TEXT: {"schema": {"type": "string"}}}}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _query(name: str, description: str, *, required: bool) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


_ADMIN_REFUSALS: Final = {
    "401": {
        **_error_response("Missing or wrong bearer token"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    },
    "403": _error_response("ADMIN_TOKEN is not configured: the admin API refuses every request"),
    "429": {
        **_error_response("Too many failed attempts from this address: locked out for a while"),
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}},
    },
}

_SIGNED_QUERY: Final = [
    _query("msg_signature", "SHA-1 over the sorted Token, timestamp, nonce and ciphertext", required=True),
    _query("timestamp", "Unix seconds (signed, not checked for freshness)", required=True),
    _query("nonce", "Random number", required=True),
]

_WEBHOOK_REFUSALS: Final = {
    "400": _text_response("Missing parameters, malformed envelope, ciphertext or notice"),
    "403": _text_response("Signature mismatch"),
}


def _admin(operation: dict[str, Any]) -> dict[str, Any]:
    return {
        **operation,
        "tags": ["admin"],
        "security": [{ADMIN_SECURITY: []}],
        "responses": {**operation["responses"], **_ADMIN_REFUSALS},
    }


def _open(operation: dict[str, Any], tag: str) -> dict[str, Any]:
    return {**operation, "tags": [tag], "security": []}


def _paths(include_metrics: bool) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/webhook": {
            "get": _open(
                {
                    "operationId": "verifyCallbackUrl",
                    "summary": "WeCom URL verification: echo the decrypted echostr",
                    "parameters": [
                        *_SIGNED_QUERY,
                        _query("echostr", "Base64 ciphertext of the text to echo", required=True),
                    ],
                    "responses": {
                        "200": _text_response("The decrypted echostr, exactly"),
                        **_WEBHOOK_REFUSALS,
                    },
                },
                "wecom",
            ),
            "post": _open(
                {
                    "operationId": "receiveCallback",
                    "summary": "WeCom callback: a signed, AES-encrypted kf_msg_or_event notice",
                    "parameters": list(_SIGNED_QUERY),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/xml": {
                                "schema": {"type": "string", "maxLength": MAX_BODY_BYTES},
                                "example": "<xml><ToUserName><![CDATA[ww…]]></ToUserName>"
                                "<Encrypt><![CDATA[…]]></Encrypt><AgentID><![CDATA[]]></AgentID></xml>",
                            }
                        },
                    },
                    "responses": {
                        "200": _text_response("Accepted (`success`); the pull runs in the background"),
                        **_WEBHOOK_REFUSALS,
                        "408": _text_response("The body did not arrive in time"),
                        "413": _text_response(f"Body larger than {MAX_BODY_BYTES} bytes"),
                        "503": _text_response("Shutting down: WeCom retries"),
                    },
                },
                "wecom",
            ),
        },
        "/status": {
            "get": _admin(
                {
                    "operationId": "getStatus",
                    "summary": "Version, uptime, store, dependencies, counters, latencies",
                    "responses": {"200": _json_response("Status", {"$ref": "#/components/schemas/Status"})},
                }
            )
        },
        "/clear": {
            "post": _admin(
                {
                    "operationId": "clearState",
                    "summary": "Start all conversations over (answered messages stay answered)",
                    "responses": {
                        "200": _json_response(
                            "Cleared",
                            {
                                "type": "object",
                                "required": ["cleared"],
                                "properties": {"cleared": {"type": "boolean", "const": True}},
                            },
                        )
                    },
                }
            )
        },
        "/get_conversation": {
            "get": _admin(
                {
                    "operationId": "getConversation",
                    "summary": "A customer's Dify conversation(s)",
                    "parameters": [
                        _query("user_id", "The customer's external_userid (wm…)", required=True),
                        _query("open_kfid", "Only this kf account (wk…)", required=False),
                    ],
                    "responses": {
                        "200": _json_response("Found", {"$ref": "#/components/schemas/ConversationLookup"}),
                        "400": _error_response("user_id missing"),
                        "404": _error_response("No conversation for this user"),
                    },
                }
            )
        },
        "/reset_conversation": {
            "post": _admin(
                {
                    "operationId": "resetConversation",
                    "summary": "Drop a customer's conversation: the next message starts a new one",
                    "requestBody": {
                        "required": True,
                        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/ResetRequest"}}},
                    },
                    "responses": {
                        "200": _json_response(
                            "Reset",
                            {
                                "type": "object",
                                "required": ["user_id", "reset", "conversations_reset"],
                                "properties": {
                                    "user_id": {"type": "string"},
                                    "reset": {"type": "boolean"},
                                    "conversations_reset": {"type": "integer", "minimum": 1},
                                },
                            },
                        ),
                        "400": _error_response("Body missing, not JSON, not an object, or bad fields"),
                        "404": _error_response("No conversation for this user"),
                    },
                }
            )
        },
        "/healthz": {
            "get": _open(
                {
                    "operationId": "liveness",
                    "summary": "Liveness",
                    "responses": {
                        "200": _json_response(
                            "Alive",
                            {"type": "object", "properties": {"status": {"type": "string", "const": "ok"}}},
                        )
                    },
                },
                "health",
            )
        },
        "/readyz": {
            "get": _open(
                {
                    "operationId": "readiness",
                    "summary": "Readiness: store reachable, configuration loaded",
                    "responses": {
                        "200": _json_response("Ready", {"$ref": "#/components/schemas/Readiness"}),
                        "503": _json_response("Not ready", {"$ref": "#/components/schemas/Readiness"}),
                    },
                },
                "health",
            )
        },
        "/openapi.json": {
            "get": _open(
                {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json_response("OpenAPI 3.1", {"type": "object"})},
                },
                "meta",
            )
        },
    }
    paths.update(_console_paths())
    if include_metrics:
        paths["/metrics"] = {
            "get": _admin(
                {
                    "operationId": "metrics",
                    "summary": "Counters and latencies in the Prometheus text format",
                    "responses": {"200": _text_response("Prometheus exposition format")},
                }
            )
        }
    return paths


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _html_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_TRY_SESSION: Final = {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$", "minLength": 8, "maxLength": 64}


def _console_paths() -> dict[str, Any]:
    """The operator console (adapters/inbound/console_api.py): its page, open like the health checks (it
    holds no data: every number comes from the admin operations below, with the token)."""
    page = {
        "get": _open(
            {
                "operationId": "console",
                "summary": "The operator console (a static page; signs in with the admin token)",
                "responses": {"200": _html_response("The page")},
            },
            "console",
        )
    }
    return {
        "/console": page,
        "/console/": {
            "get": _open(
                {
                    "operationId": "consoleSlash",
                    "summary": "Redirects to /console",
                    "responses": {"308": {"description": "Redirect to /console"}},
                },
                "console",
            )
        },
        "/console/{name}": {
            "get": _open(
                {
                    "operationId": "consoleAsset",
                    "summary": "One of the console's static files (script, style sheet, icon)",
                    "parameters": [_path("name", "console.js, i18n.js, charts.js, console.css, icon.svg")],
                    "responses": {
                        "200": {"description": "The file"},
                        "404": _error_response("No such file"),
                    },
                },
                "console",
            )
        },
        "/admin/overview": {
            "get": _admin(
                {
                    "operationId": "consoleOverview",
                    "summary": "Health, today's and the last hour's counters, per-minute series, Dify apps",
                    "responses": {
                        "200": _json_response("Overview", {"$ref": "#/components/schemas/Overview"})
                    },
                }
            )
        },
        "/admin/customers": {
            "get": _admin(
                {
                    "operationId": "consoleCustomers",
                    "summary": "This instance's most recently active customers, newest first",
                    "parameters": [
                        _query("q", "Only customer ids (or nicknames) containing this", required=False),
                        _query("limit", "At most this many (1 to 200, default 50)", required=False),
                    ],
                    "responses": {
                        "200": _json_response(
                            "Customers",
                            _object(
                                ["instance", "customers"],
                                {
                                    "instance": {"type": "string"},
                                    "query": {"type": "string"},
                                    "customers": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/CustomerRow"},
                                    },
                                },
                            ),
                        ),
                        "400": _error_response("limit is not a number"),
                    },
                }
            )
        },
        "/admin/customers/{open_kfid}/{external_userid}": {
            "get": _admin(
                {
                    "operationId": "consoleCustomer",
                    "summary": "One customer: conversation, session owner, entry, recent outcomes",
                    "parameters": [
                        _path("open_kfid", "The kf account (wk…)"),
                        _path("external_userid", "The customer (wm…)"),
                    ],
                    "responses": {
                        "200": _json_response("The customer", {"type": "object"}),
                        "400": _error_response("Not WeCom ids"),
                        "404": _error_response("Not seen by this instance and no conversation stored"),
                    },
                }
            )
        },
        "/admin/problems": {
            "get": _admin(
                {
                    "operationId": "consoleProblems",
                    "summary": "The last 200 problems this instance met, newest first, each with a hint",
                    "responses": {
                        "200": _json_response(
                            "Problems",
                            _object(
                                ["instance", "problems"],
                                {
                                    "instance": {"type": "string"},
                                    "problems": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Problem"},
                                    },
                                },
                            ),
                        )
                    },
                }
            )
        },
        "/admin/try": {
            "post": _admin(
                {
                    "operationId": "consoleTry",
                    "summary": "Say something to the Dify app through the real core, as simulate does "
                    "(nothing reaches WeCom); the bubbles the customer would see",
                    "requestBody": {
                        "required": True,
                        "content": {
                            _JSON: {
                                "schema": _object(
                                    ["text", "session"],
                                    {
                                        "text": {"type": "string", "minLength": 1, "maxLength": 2000},
                                        "session": _TRY_SESSION,
                                        "open_kfid": {"type": "string"},
                                    },
                                )
                            }
                        },
                    },
                    "responses": {
                        "200": _json_response(
                            "The bot's messages",
                            _object(
                                ["session", "bubbles"],
                                {
                                    "session": {"type": "string"},
                                    "app": {"type": "string"},
                                    "bubbles": {"type": "array", "items": {"type": "object"}},
                                },
                            ),
                        ),
                        "400": _error_response("Body missing, not JSON, or bad fields"),
                        "502": _error_response("The simulation failed"),
                        "504": _error_response("The bot did not finish in time"),
                    },
                }
            )
        },
        "/admin/try/reset": {
            "post": _admin(
                {
                    "operationId": "consoleTryReset",
                    "summary": "Forget a try-it chat (its conversation and session)",
                    "requestBody": {
                        "required": True,
                        "content": {_JSON: {"schema": _object(["session"], {"session": _TRY_SESSION})}},
                    },
                    "responses": {
                        "200": _json_response(
                            "Forgotten",
                            _object(
                                ["session", "reset"],
                                {"session": {"type": "string"}, "reset": {"type": "boolean"}},
                            ),
                        ),
                        "400": _error_response("Body missing, not JSON, or bad fields"),
                    },
                }
            )
        },
    }


_SCHEMAS: Final = {
    "Overview": {
        "type": "object",
        "required": ["instance", "status", "store", "windows", "per_minute"],
        "properties": {
            "instance": {"type": "string"},
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "version": {"type": "string"},
            "uptime_s": {"type": "number"},
            "store": {"type": "object"},
            "wecom": {"type": ["object", "null"]},
            "dify": {"type": ["object", "null"]},
            "windows": {"type": "object"},
            "per_minute": {"type": "array", "items": {"type": "object"}},
            "in_flight": {"type": "integer"},
            "dify_apps": {"type": "object"},
            "kf_accounts": {"type": "array", "items": {"type": "string"}},
        },
    },
    "CustomerRow": {
        "type": "object",
        "required": ["open_kfid", "customer", "last_message_at", "turns", "session_owner"],
        "properties": {
            "open_kfid": {"type": "string"},
            "customer": {"type": "string"},
            "nickname": {"type": "string"},
            "last_message_at": {"type": "number"},
            "messages": {"type": "integer"},
            "turns": {"type": "integer"},
            "session_owner": {"type": "string", "enum": ["bot", "queue", "human", "ended", "unknown"]},
            "last_outcome": {"type": "string"},
        },
    },
    "Problem": {
        "type": "object",
        "required": ["at", "kind", "summary", "hint"],
        "properties": {
            "at": {"type": "number"},
            "kind": {
                "type": "string",
                "enum": [
                    "dify_error",
                    "wecom_errcode",
                    "send_failure",
                    "handoff_refused",
                    "media_failure",
                    "store_degraded",
                ],
            },
            "code": {"type": "string"},
            "open_kfid": {"type": "string"},
            "customer": {"type": "string"},
            "summary": {"type": "string"},
            "hint": {"type": "string"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "ResetRequest": {
        "type": "object",
        "required": ["user_id"],
        "properties": {
            "user_id": {"type": "string", "minLength": 1, "description": "external_userid (wm…)"},
            "open_kfid": {"type": "string", "description": "Only this kf account (wk…)"},
        },
    },
    "Conversation": {
        "type": "object",
        "properties": {
            "open_kfid": {"type": "string"},
            "conversation_id": {"type": "string"},
            "started_at": {"type": "number"},
            "last_active_at": {"type": "number"},
            "turns": {"type": "integer"},
        },
    },
    "ConversationLookup": {
        "allOf": [
            {"$ref": "#/components/schemas/Conversation"},
            {
                "type": "object",
                "required": ["user_id", "conversations"],
                "properties": {
                    "user_id": {"type": "string"},
                    "conversations": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/Conversation"},
                    },
                },
            },
        ]
    },
    "Status": {
        "type": "object",
        "required": ["status", "version", "uptime_s", "store", "counters"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "version": {"type": "string"},
            "uptime_s": {"type": "number"},
            "store": {"type": "object"},
            "dependencies": {"type": "object"},
            "counters": {"type": "object", "additionalProperties": {"type": "integer"}},
            "latency_s": {"type": "object"},
            "in_flight": {"type": "integer"},
            "known_kfs": {"type": "array", "items": {"type": "string"}},
            "instance": {
                "type": "string",
                "description": "This instance (the console's history is per instance)",
            },
            "windows": {"type": "object", "description": "Today's and the last hour's console counters"},
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready"],
        "properties": {
            "ready": {"type": "boolean"},
            "store": {"type": "string"},
            "store_reachable": {"type": "boolean"},
            "config": {"type": "string"},
        },
    },
}


def openapi_document(*, version: str, include_metrics: bool = True) -> dict[str, Any]:
    """The OpenAPI document (a fresh copy); `include_metrics` mirrors whether the app serves /metrics."""
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "kf-dify",
            "version": version,
            "description": "WeCom Customer Service callbacks answered by a Dify app, and its admin API. "
            "Admin operations (and /metrics) need `Authorization: Bearer <ADMIN_TOKEN>`: 401 without it "
            "or with a wrong one, 403 for every request while ADMIN_TOKEN is not configured, 429 with "
            "Retry-After for an address after repeated failures.",
        },
        "paths": _paths(include_metrics),
        "components": {
            "securitySchemes": {
                ADMIN_SECURITY: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The configured ADMIN_TOKEN, compared in constant time",
                }
            },
            "schemas": _SCHEMAS,
        },
    }
    return copy.deepcopy(document)
