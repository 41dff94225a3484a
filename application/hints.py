"""What an operator should do about a WeCom or Dify failure: one hint per errcode or error code.

Shared by `python bootstrap.py check` (adapters/inbound/cli_check.py) and the console's problem list
(application/insights.py), so both give the same advice. Error codes: docs/wecom-kf.md, docs/dify.md.
"""

from __future__ import annotations

import re
from typing import Final

_FROM_IP: Final = re.compile(r"from ip:?\s*([0-9A-Fa-f.:]+)", re.IGNORECASE)

DIFY_UNREACHABLE: Final = (
    "Dify unreachable at DIFY_API_BASE: check the URL ends with /v1 and the host is reachable from here"
)


def wecom_hint_for(errcode: int | None, errmsg: str = "", api_base: str = "") -> str:
    """The hint for WeCom's `errcode` (None: WeCom could not be reached)."""
    code = errcode
    if code is None:
        return "WeCom API unreachable: check network/proxy and WECOM_API_BASE" + (
            f" ({api_base})" if api_base else ""
        )
    if code == 40001:
        return (
            "wrong CORP_SECRET (or the app is disabled): use the secret of the self-built app listed under "
            "微信客服 → 可调用接口的应用"
        )
    if code == 40013:
        return "wrong CORP_ID: use the 企业ID (ww...) from 我的企业 → 企业信息"
    if code == 40091:
        return (
            "CORP_SECRET belongs to another corp or app: use the secret of the self-built app listed under "
            "微信客服 → 可调用接口的应用 in this corp"
        )
    if code == 41004:
        return "CORP_SECRET is empty: set the secret of the self-built app"
    if code == 60020:
        match = _FROM_IP.search(errmsg or "")
        ip = f" ({match.group(1)})" if match else ""
        return (
            f"this server's IP{ip} is not in the app's 企业可信IP list (takes ~1 min to apply): add it under "
            "应用管理 → the app → 企业可信IP"
        )
    if code == 45009:
        return "WeCom rate limit (repeated wrong secrets can block this IP for an hour): wait, then retry"
    if code == -1:
        return "WeCom is busy: retry in a minute"
    return f"WeCom refused with errcode {code}: look it up at https://developer.work.weixin.qq.com/devtool/query?e={code}"


def dify_hint_for(code: str, status: int | None = None) -> str:
    """The hint for Dify's error `code` (or the adapter's own: timeout, unreachable, ...) and HTTP status."""
    if status == 401 or code == "unauthorized":
        return "DIFY_API_KEY is wrong: use the app's API key from Dify → 访问 API (app-...)"
    if status == 403 or code in ("forbidden", "app_not_found", "app_abnormal_status", "app_api_disabled"):
        return (
            "the Dify app is deleted, disabled or its API access is off, or the workspace is archived: "
            "check the app in Dify → 访问 API"
        )
    if code in ("unreachable", "timeout"):
        return DIFY_UNREACHABLE
    if status == 404:
        return "DIFY_API_BASE path is wrong (it must end in /v1)"
    if code == "app_unavailable":
        return "the app has no published configuration: publish it in Dify (发布) first"
    if code == "bad_response":
        return "DIFY_API_BASE answered something that is not Dify's API: check the URL ends with /v1"
    if status is not None and status >= 500:
        return "Dify failed on its side: check the Dify server's logs, then retry"
    return "check DIFY_API_BASE and DIFY_API_KEY"
