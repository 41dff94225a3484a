"""The input variables a Dify app declares (`/parameters` → `user_input_form`, docs/dify.md) and how a value
is made to fit one: text within its length, a select's value among its options, a number that is a number."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TEXT_KINDS = frozenset({"text-input", "paragraph"})
SELECT_KIND = "select"
NUMBER_KIND = "number"
# Dify's own cap on a text variable without max_length is 256 characters for text-input; paragraph has none.
# We never send more than this, whatever the form says.
MAX_VALUE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class FormField:
    """One declared variable: `kind` is the key its object is wrapped in (`text-input`, `select`, ...)."""

    variable: str
    kind: str
    label: str = ""
    required: bool = False
    max_length: int = 0  # 0: no limit declared
    options: tuple[str, ...] = ()

    def fit(self, value: str) -> str | None:
        """`value` as this variable takes it, or None when it cannot be sent."""
        if self.kind in TEXT_KINDS:
            limit = self.max_length if self.max_length > 0 else MAX_VALUE_CHARS
            return value[: min(limit, MAX_VALUE_CHARS)]
        if self.kind == SELECT_KIND:
            return value if value in self.options else None
        if self.kind == NUMBER_KIND:
            try:
                number = float(value)
            except ValueError:
                return None
            return value if math.isfinite(number) else None
        return None  # files and other kinds are not filled from text


def parse_input_form(raw: object) -> tuple[FormField, ...]:
    """`user_input_form` as Dify sends it: a list of one-key objects, {kind: {variable, label, ...}}.
    Anything malformed is skipped."""
    if not isinstance(raw, list):
        return ()
    fields: list[FormField] = []
    for item in raw:
        if not isinstance(item, Mapping) or len(item) != 1:
            continue
        ((kind, spec),) = item.items()
        if not isinstance(kind, str) or not isinstance(spec, Mapping):
            continue
        variable = spec.get("variable")
        if not isinstance(variable, str) or not variable:
            continue
        fields.append(
            FormField(
                variable=variable,
                kind=kind,
                label=_string(spec.get("label")),
                required=spec.get("required") is True,
                max_length=_positive_int(spec.get("max_length")),
                options=_strings(spec.get("options")),
            )
        )
    return tuple(fields)


def fill_inputs(
    form: Sequence[FormField], *, context: Mapping[str, str], static: Mapping[str, Any]
) -> dict[str, Any]:
    """The `inputs` of a question: every `static` value (`[BOT] DIFY_INPUTS`, as configured), plus each
    declared variable `context` has a fitting, non-empty value for. Undeclared context is never sent."""
    inputs: dict[str, Any] = dict(static)
    for form_field in form:
        name = form_field.variable
        if name in inputs or name not in context:
            continue
        value = context[name]
        fitted = form_field.fit(value) if value else None
        if fitted:
            inputs[name] = fitted
    return inputs


def unfillable_required(
    form: Sequence[FormField], *, fillable: frozenset[str], static: Mapping[str, Any]
) -> list[str]:
    """Required variables neither `static` nor the service can fill (Dify refuses every question then)."""
    return [
        f.variable for f in form if f.required and f.variable not in static and f.variable not in fillable
    ]


def _string(value: object) -> str:
    return value if isinstance(value, str) else ""


def _positive_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
