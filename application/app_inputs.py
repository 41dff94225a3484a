"""The `inputs` of each question: what the Dify app declares (`user_input_form`), filled from the customer's
profile, entry context and message; `[BOT] DIFY_INPUTS` on top.

The app decides: a variable named like one below is filled on every request when the app declares it, and
never sent when it does not. Values respect the form (text length, select options). `[BOT] DIFY_INPUTS`
(static) is sent as configured and wins for a name it sets. A required variable nobody can fill makes Dify
refuse every question: `unfillable()` names them for `check` and the start-up report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from application.app_parameters import AppParametersCache
from application.customer_profile import ProfileBook
from application.errors import ChatEngineError
from application.routing import KfRoute, Routing
from domain.app_form import FormField, fill_inputs, unfillable_required
from domain.customer import UNKNOWN_GENDER, CustomerProfile
from domain.messages import InboundMessage

log = logging.getLogger("kfdify.inputs")

# The variables the service fills, and whether the value comes from the customer's profile.
FILLED_VARIABLES: dict[str, bool] = {
    "nickname": True,
    "gender": True,
    "unionid": True,
    "external_userid": False,
    "open_kfid": False,
    "scene": True,
    "scene_param": True,
    "channels_nickname": True,
    "message_time": False,
}
FILLABLE = frozenset(FILLED_VARIABLES)


def message_time(send_time: int) -> str:
    """The customer message's send time, local ISO 8601 (e.g. 2026-12-02T12:30:05+08:00)."""
    return datetime.fromtimestamp(send_time).astimezone().isoformat(timespec="seconds")


def context_values(message: InboundMessage, profile: CustomerProfile | None) -> dict[str, str]:
    """Every variable the service can fill for this message, by name ("" when unknown)."""
    entry = profile.entry if profile is not None else None
    return {
        "nickname": profile.nickname if profile is not None else "",
        "gender": profile.gender_text if profile is not None else UNKNOWN_GENDER,
        "unionid": profile.unionid if profile is not None else "",
        "external_userid": message.external_userid,
        "open_kfid": message.open_kfid,
        "scene": entry.scene if entry is not None else "",
        "scene_param": entry.scene_param if entry is not None else "",
        "channels_nickname": entry.channels_nickname if entry is not None else "",
        "message_time": message_time(message.send_time) if message.send_time > 0 else "",
    }


class AppInputs:
    def __init__(
        self,
        *,
        parameters: AppParametersCache,
        profiles: ProfileBook | None,
        static: Mapping[str, Any],
        parameters_wait_s: float = 5.0,
    ) -> None:
        """`parameters_wait_s`: how long a question waits for the app's form when it is not cached (the read
        goes on in the background for the next question)."""
        self._parameters_wait_s = parameters_wait_s
        self._parameters = parameters
        self._profiles = profiles
        self._static = dict(static)
        self._reported: set[int] = set()
        self._report_task: asyncio.Task[None] | None = None

    async def for_message(self, message: InboundMessage, route: KfRoute) -> dict[str, Any]:
        """The question's inputs. Never raises: without the app's form only DIFY_INPUTS go."""
        reading = asyncio.ensure_future(self._parameters.get(route))
        reading.add_done_callback(_retrieve)
        try:
            form = (await asyncio.wait_for(asyncio.shield(reading), self._parameters_wait_s)).input_form
        except (ChatEngineError, TimeoutError):
            return dict(self._static)
        self._report_once(route, form)
        wanted = [f for f in form if f.variable in FILLABLE and f.variable not in self._static]
        if not wanted:
            return dict(self._static)
        profile = None
        if self._profiles is not None and any(FILLED_VARIABLES[f.variable] for f in wanted):
            profile = await self._profiles.lookup(message.customer)
        context = context_values(message, profile)
        # A required variable we know but have no value for yet gets "未知" where it fits, not a refusal.
        for form_field in wanted:
            if form_field.required and not context[form_field.variable]:
                context[form_field.variable] = UNKNOWN_GENDER
        return fill_inputs(form, context=context, static=self._static)

    async def unfillable(self, route: KfRoute) -> list[str]:
        """Required variables of the route's app that neither DIFY_INPUTS nor the service fills. Raises
        ChatEngineError when the app's parameters cannot be read."""
        form = (await self._parameters.get(route)).input_form
        return unfillable_required(form, fillable=FILLABLE, static=self._static)

    async def report(self, routing: Routing) -> None:
        """At start: one WARNING per app with required variables nobody fills (the app's parameters are
        read now; an app that cannot be reached is reported with its first message)."""
        for route in routing.all_routes():
            try:
                form = (await self._parameters.get(route)).input_form
            except Exception:  # unreachable now: reported with the first message instead
                continue
            self._report_once(route, form)

    def start_report(self, routing: Routing) -> None:
        """`report()` in the background (at start: the service does not wait for Dify)."""
        self._report_task = asyncio.create_task(self.report(routing))

    async def aclose(self) -> None:
        if self._report_task is not None and not self._report_task.done():
            self._report_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._report_task

    def _report_once(self, route: KfRoute, form: tuple[FormField, ...]) -> None:
        key = id(route.engine)
        if key in self._reported:
            return
        self._reported.add(key)
        missing = unfillable_required(form, fillable=FILLABLE, static=self._static)
        if missing:
            log.warning(
                "the Dify app of route %s requires input variable(s) %s that nobody fills: Dify will refuse "
                "every question; set them in [BOT] DIFY_INPUTS or make them optional in the app",
                route.name,
                ", ".join(missing),
            )


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A form read nobody waits for any more may fail: its error is the next question's business."""
    if not task.cancelled():
        task.exception()
