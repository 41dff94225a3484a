"""Which Dify app and which texts serve a kf account: one deployment can serve several accounts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from application.options import ReplyTexts
from application.ports import ChatEngine


@dataclass(frozen=True, slots=True)
class KfRoute:
    name: str
    engine: ChatEngine
    texts: ReplyTexts
    # Handoff target: this servicer (service_state 3), or the queue (2) when empty.
    servicer_userid: str = ""
    # The Dify app's name for the concurrency limiter and /status (`dify_app_key`; never the API key).
    dify_app: str = ""


@dataclass(frozen=True, slots=True)
class Routing:
    """Accounts not listed use the default route."""

    default: KfRoute
    routes: Mapping[str, KfRoute] = field(default_factory=dict)

    def for_kf(self, open_kfid: str) -> KfRoute:
        return self.routes.get(open_kfid, self.default)

    def all_routes(self) -> list[KfRoute]:
        seen: dict[int, KfRoute] = {id(self.default): self.default}
        for route in self.routes.values():
            seen.setdefault(id(route), route)
        return list(seen.values())
