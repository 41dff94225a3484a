"""The operator console's part of the OpenAPI document (openapi.py): its page and static files, the
operations behind it (adapters/inbound/console_api.py) and their schemas."""

from __future__ import annotations

from typing import Any, Final

from adapters.inbound.openapi_parts import (
    JSON,
    admin_operation,
    error_response,
    html_response,
    json_response,
    object_schema,
    open_operation,
    path_param,
    query_param,
)

_TRY_SESSION: Final = {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$", "minLength": 8, "maxLength": 64}


def console_paths() -> dict[str, Any]:
    """The operator console (adapters/inbound/console_api.py): its page, open like the health checks (it
    holds no data: every number comes from the admin operations below, with the token)."""
    page = {
        "get": open_operation(
            {
                "operationId": "console",
                "summary": "The operator console (a static page; signs in with the admin token)",
                "responses": {"200": html_response("The page")},
            },
            "console",
        )
    }
    return {
        "/console": page,
        "/console/": {
            "get": open_operation(
                {
                    "operationId": "consoleSlash",
                    "summary": "Redirects to /console",
                    "responses": {"308": {"description": "Redirect to /console"}},
                },
                "console",
            )
        },
        "/console/{name}": {
            "get": open_operation(
                {
                    "operationId": "consoleAsset",
                    "summary": "One of the console's static files (script, style sheet, icon)",
                    "parameters": [
                        path_param("name", "console.js, i18n.js, charts.js, console.css, icon.svg")
                    ],
                    "responses": {
                        "200": {"description": "The file"},
                        "404": error_response("No such file"),
                    },
                },
                "console",
            )
        },
        "/admin/overview": {
            "get": admin_operation(
                {
                    "operationId": "consoleOverview",
                    "summary": "Health, today's and the last hour's counters, per-minute series, Dify apps",
                    "responses": {
                        "200": json_response("Overview", {"$ref": "#/components/schemas/Overview"})
                    },
                }
            )
        },
        "/admin/customers": {
            "get": admin_operation(
                {
                    "operationId": "consoleCustomers",
                    "summary": "This instance's most recently active customers, newest first",
                    "parameters": [
                        query_param("q", "Only customer ids (or nicknames) containing this", required=False),
                        query_param("limit", "At most this many (1 to 200, default 50)", required=False),
                    ],
                    "responses": {
                        "200": json_response(
                            "Customers",
                            object_schema(
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
                        "400": error_response("limit is not a number"),
                    },
                }
            )
        },
        "/admin/customers/{open_kfid}/{external_userid}": {
            "get": admin_operation(
                {
                    "operationId": "consoleCustomer",
                    "summary": "One customer: conversation, session owner, entry, recent outcomes",
                    "parameters": [
                        path_param("open_kfid", "The kf account (wk…)"),
                        path_param("external_userid", "The customer (wm…)"),
                    ],
                    "responses": {
                        "200": json_response("The customer", {"type": "object"}),
                        "400": error_response("Not WeCom ids"),
                        "404": error_response("Not seen by this instance and no conversation stored"),
                    },
                }
            )
        },
        "/admin/problems": {
            "get": admin_operation(
                {
                    "operationId": "consoleProblems",
                    "summary": "The last 200 problems this instance met, newest first, each with a hint",
                    "responses": {
                        "200": json_response(
                            "Problems",
                            object_schema(
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
            "post": admin_operation(
                {
                    "operationId": "consoleTry",
                    "summary": "Say something to the Dify app through the real core, as simulate does "
                    "(nothing reaches WeCom); the bubbles the customer would see",
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {
                                "schema": object_schema(
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
                        "200": json_response(
                            "The bot's messages",
                            object_schema(
                                ["session", "bubbles"],
                                {
                                    "session": {"type": "string"},
                                    "app": {"type": "string"},
                                    "bubbles": {"type": "array", "items": {"type": "object"}},
                                },
                            ),
                        ),
                        "400": error_response("Body missing, not JSON, or bad fields"),
                        "502": error_response("The simulation failed"),
                        "504": error_response("The bot did not finish in time"),
                    },
                }
            )
        },
        "/admin/try/reset": {
            "post": admin_operation(
                {
                    "operationId": "consoleTryReset",
                    "summary": "Forget a try-it chat (its conversation and session)",
                    "requestBody": {
                        "required": True,
                        "content": {JSON: {"schema": object_schema(["session"], {"session": _TRY_SESSION})}},
                    },
                    "responses": {
                        "200": json_response(
                            "Forgotten",
                            object_schema(
                                ["session", "reset"],
                                {"session": {"type": "string"}, "reset": {"type": "boolean"}},
                            ),
                        ),
                        "400": error_response("Body missing, not JSON, or bad fields"),
                    },
                }
            )
        },
    }


# Listed first in the document's schemas.
CONSOLE_SCHEMAS: Final = {
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
}
