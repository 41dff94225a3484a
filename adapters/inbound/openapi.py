"""The service's HTTP interface as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Written by hand, next to the routes in `http.py` (a test checks both list the same operations). It describes
shapes only: no configuration value, no state. Operations with `security: bearerAuth` are the admin API; the
others are open (WeCom's callback proves itself by signature, health checks need no token). /metrics needs
the admin token too.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from adapters.inbound.openapi_console import CONSOLE_SCHEMAS, console_paths
from adapters.inbound.openapi_parts import (
    ADMIN_SECURITY,
    JSON,
    admin_operation,
    error_response,
    json_response,
    open_operation,
    query_param,
    text_response,
)
from adapters.inbound.wecom_crypto import MAX_BODY_BYTES

__all__ = ["ADMIN_SECURITY", "openapi_document"]

_SIGNED_QUERY: Final = [
    query_param(
        "msg_signature", "SHA-1 over the sorted Token, timestamp, nonce and ciphertext", required=True
    ),
    query_param("timestamp", "Unix seconds (signed, not checked for freshness)", required=True),
    query_param("nonce", "Random number", required=True),
]

_WEBHOOK_REFUSALS: Final = {
    "400": text_response("Missing parameters, malformed envelope, ciphertext or notice"),
    "403": text_response("Signature mismatch"),
}


def _paths(include_metrics: bool) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/webhook": {
            "get": open_operation(
                {
                    "operationId": "verifyCallbackUrl",
                    "summary": "WeCom URL verification: echo the decrypted echostr",
                    "parameters": [
                        *_SIGNED_QUERY,
                        query_param("echostr", "Base64 ciphertext of the text to echo", required=True),
                    ],
                    "responses": {
                        "200": text_response("The decrypted echostr, exactly"),
                        **_WEBHOOK_REFUSALS,
                    },
                },
                "wecom",
            ),
            "post": open_operation(
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
                        "200": text_response("Accepted (`success`); the pull runs in the background"),
                        **_WEBHOOK_REFUSALS,
                        "408": text_response("The body did not arrive in time"),
                        "413": text_response(f"Body larger than {MAX_BODY_BYTES} bytes"),
                        "503": text_response("Shutting down: WeCom retries"),
                    },
                },
                "wecom",
            ),
        },
        "/status": {
            "get": admin_operation(
                {
                    "operationId": "getStatus",
                    "summary": "Version, uptime, store, dependencies, counters, latencies",
                    "responses": {"200": json_response("Status", {"$ref": "#/components/schemas/Status"})},
                }
            )
        },
        "/clear": {
            "post": admin_operation(
                {
                    "operationId": "clearState",
                    "summary": "Start all conversations over (answered messages stay answered)",
                    "responses": {
                        "200": json_response(
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
            "get": admin_operation(
                {
                    "operationId": "getConversation",
                    "summary": "A customer's Dify conversation(s)",
                    "parameters": [
                        query_param("user_id", "The customer's external_userid (wm…)", required=True),
                        query_param("open_kfid", "Only this kf account (wk…)", required=False),
                    ],
                    "responses": {
                        "200": json_response("Found", {"$ref": "#/components/schemas/ConversationLookup"}),
                        "400": error_response("user_id missing"),
                        "404": error_response("No conversation for this user"),
                    },
                }
            )
        },
        "/reset_conversation": {
            "post": admin_operation(
                {
                    "operationId": "resetConversation",
                    "summary": "Drop a customer's conversation: the next message starts a new one",
                    "requestBody": {
                        "required": True,
                        "content": {JSON: {"schema": {"$ref": "#/components/schemas/ResetRequest"}}},
                    },
                    "responses": {
                        "200": json_response(
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
                        "400": error_response("Body missing, not JSON, not an object, or bad fields"),
                        "404": error_response("No conversation for this user"),
                    },
                }
            )
        },
        "/healthz": {
            "get": open_operation(
                {
                    "operationId": "liveness",
                    "summary": "Liveness",
                    "responses": {
                        "200": json_response(
                            "Alive",
                            {"type": "object", "properties": {"status": {"type": "string", "const": "ok"}}},
                        )
                    },
                },
                "health",
            )
        },
        "/readyz": {
            "get": open_operation(
                {
                    "operationId": "readiness",
                    "summary": "Readiness: store reachable, configuration loaded",
                    "responses": {
                        "200": json_response("Ready", {"$ref": "#/components/schemas/Readiness"}),
                        "503": json_response("Not ready", {"$ref": "#/components/schemas/Readiness"}),
                    },
                },
                "health",
            )
        },
        "/openapi.json": {
            "get": open_operation(
                {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": json_response("OpenAPI 3.1", {"type": "object"})},
                },
                "meta",
            )
        },
    }
    paths.update(console_paths())
    if include_metrics:
        paths["/metrics"] = {
            "get": admin_operation(
                {
                    "operationId": "metrics",
                    "summary": "Counters and latencies in the Prometheus text format",
                    "responses": {"200": text_response("Prometheus exposition format")},
                }
            )
        }
    return paths


_SCHEMAS: Final = {
    **CONSOLE_SCHEMAS,
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
