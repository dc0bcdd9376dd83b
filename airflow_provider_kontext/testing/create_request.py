"""What a create request may carry: the body's schema, the model's input, ``Prefer`` and ``Cancel-After``.

``predictions.py`` runs these checks before it stores anything, so a rejected create leaves no
prediction behind. Each check raises :class:`~airflow_provider_kontext.testing.problems.ProblemError`
with the status Replicate answers (400 for a bad header, 422 naming the field for a bad body).
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.models import validate_input
from airflow_provider_kontext.testing.problems import ProblemError, invalid_field
from airflow_provider_kontext.testing.webhooks import WEBHOOK_EVENTS

#: The longest ``Prefer: wait`` Replicate honours.
MAX_WAIT_SECONDS = 60.0
#: The shortest ``Cancel-After`` Replicate accepts.
MIN_CANCEL_AFTER_SECONDS = 5.0
#: The keys a create's body may have (the OpenAPI description forbids any other).
_MODEL_CREATE_KEYS = frozenset({"input", "stream", "webhook", "webhook_events_filter"})
_VERSION_CREATE_KEYS = _MODEL_CREATE_KEYS | {"version"}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h)?)+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_prefer_wait(value: str | None) -> float | None:
    """Return the seconds to hold a create open from a ``Prefer`` header.

    ``wait`` is 60, ``wait=N`` is N clamped to 1..60; ``None`` without a wait preference.

    :raises ProblemError: 400 for a wait value that is not a number.
    """
    if not value:
        return None
    for preference in re.split(r"[,;]", value):
        name, _, argument = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        argument = argument.strip().strip('"')
        if not argument:
            return MAX_WAIT_SECONDS
        try:
            seconds = float(argument)
        except ValueError:
            raise ProblemError(
                400, "Bad Request", f"Prefer: wait={argument} is not a number of seconds"
            ) from None
        if not math.isfinite(seconds):
            raise ProblemError(400, "Bad Request", f"Prefer: wait={argument} is not a number of seconds")
        return min(MAX_WAIT_SECONDS, max(1.0, seconds))
    return None


def parse_cancel_after(value: str | None) -> float | None:
    """Return the seconds of a ``Cancel-After`` header, ``None`` without one.

    Accepts ``90s``, ``5m``, ``1h30m``, ``500ms`` or plain seconds, at least
    :data:`MIN_CANCEL_AFTER_SECONDS`.

    :raises ProblemError: 400 for anything else or a shorter duration.
    """
    if value is None or not value.strip():
        return None
    text = value.strip().lower().replace(" ", "")
    if not _DURATION.fullmatch(text):
        raise ProblemError(
            400, "Bad Request", f"Cancel-After: {value!r} is not a duration like '90s', '5m' or '120'"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[unit or None] for n, unit in _DURATION_PART.findall(text))
    if seconds < MIN_CANCEL_AFTER_SECONDS:
        raise ProblemError(
            400,
            "Bad Request",
            f"Cancel-After: {value!r} is shorter than the minimum of {MIN_CANCEL_AFTER_SECONDS:g} seconds",
        )
    return seconds


def check_create_body(document: dict[str, Any], *, by_version: bool) -> None:
    """Enforce the prediction request schema.

    Only its keys, a URL ``webhook``, a list of known ``webhook_events_filter`` events and a
    boolean ``stream`` pass; ``version`` only when ``by_version`` (``POST /v1/predictions``).

    :raises ProblemError: 422 naming the field.
    """
    allowed = _VERSION_CREATE_KEYS if by_version else _MODEL_CREATE_KEYS
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise invalid_field(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    if "stream" in document and not isinstance(document["stream"], bool):
        raise invalid_field("stream", "must be a boolean")
    webhook = document.get("webhook")
    if webhook is not None:
        parts = urlsplit(webhook) if isinstance(webhook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid_field("webhook", "must be an HTTPS URL")
    events = document.get("webhook_events_filter")
    if events is not None and (
        not isinstance(events, list) or any(event not in WEBHOOK_EVENTS for event in events)
    ):
        raise invalid_field("webhook_events_filter", f"must be a list of {', '.join(WEBHOOK_EVENTS)}")


def model_input(model: str, document: dict[str, Any]) -> dict[str, Any]:
    """Return the create's ``input``, checked against the model's input schema.

    :raises ProblemError: 422 ("Input validation failed") for a missing ``input`` or one the model
        refuses, each bad field in ``invalid_fields``.
    """
    raw_input = document.get("input")
    if not isinstance(raw_input, dict):
        raise ProblemError(
            422,
            "Input validation failed",
            "input: field required (an object with the model's inputs)",
            extra={"invalid_fields": [{"field": "input", "description": "field required"}]},
        )
    try:
        return validate_input(model, raw_input)
    except FluxKontextInputError as exc:
        raise ProblemError(
            422,
            "Input validation failed",
            str(exc),
            extra={"invalid_fields": [{"field": f, "description": m} for f, m in exc.errors]},
        ) from None
