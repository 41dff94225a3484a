"""Settings for `simulate` against a local Dify server: only the Dify app differs between tests."""

from __future__ import annotations

from typing import Any

from adapters.inbound.config_file import Settings


def simulation_settings(dify_url: str, dify_api_key: str, **overrides: Any) -> Settings:
    """Placeholder WeCom credentials (the simulation's WeCom is in-process) and the given Dify app."""
    return Settings(
        corp_id="wwsimulation0001",
        corp_secret="simulation-corp-secret",
        token="simulationtoken",
        encoding_aes_key="A" * 43,
        dify_api_base=f"{dify_url}/v1",
        dify_api_key=dify_api_key,
        **overrides,
    )
