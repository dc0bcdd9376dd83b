"""What the emulator does for each API call, independent of the web framework that serves it.

:class:`EmulatorService` holds the state (predictions, uploads, the request log, the armed faults)
and implements the endpoints as methods that return JSON-ready data or raise :class:`ProblemError`.
``emulator.py`` only maps HTTP onto these methods. The methods run on the server's event loop; the
state is guarded by a lock so tests can inspect and reset it from their own thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import itertools
import json
import math
import random
import re
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlencode, urlsplit

from airflow_provider_kontext.exceptions import KontextInputError
from airflow_provider_kontext.models import (
    DEFAULT_MODEL,
    INPUT_MODELS,
    Prediction,
    PredictionStatus,
    input_model_for,
    validate_input,
)
from airflow_provider_kontext.testing.faults import Faults
from airflow_provider_kontext.testing.imaging import ImageError, decode_data_uri, edit_image
from airflow_provider_kontext.testing.lifecycle import (
    Clock,
    PredictionRecord,
    Timing,
    new_id,
    starting_json,
)
from airflow_provider_kontext.testing.ratelimit import RateLimit, RateLimiter
from airflow_provider_kontext.testing.webhooks import (
    DEFAULT_WEBHOOK_EVENTS,
    WEBHOOK_EVENTS,
    WebhookSender,
    new_secret,
)

#: Fake version ids of the models the emulator serves (64 hex characters, like Replicate's).
MODEL_VERSIONS: dict[str, str] = {
    model: hashlib.sha256(f"kontext-emulator:{model}".encode()).hexdigest() for model in INPUT_MODELS
}
_VERSION_MODELS = {version: model for model, version in MODEL_VERSIONS.items()}

#: The longest ``Prefer: wait`` Replicate honours.
MAX_WAIT_SECONDS = 60.0
#: The shortest ``Cancel-After`` Replicate accepts.
MIN_CANCEL_AFTER_SECONDS = 5.0
#: The keys a create's body may have (the OpenAPI description forbids any other).
_MODEL_CREATE_KEYS = frozenset({"input", "stream", "webhook", "webhook_events_filter"})
_VERSION_CREATE_KEYS = _MODEL_CREATE_KEYS | {"version"}
#: Largest accepted upload, like Replicate's client-side limit.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
#: Largest input image fetched from an http://127.0.0.1 URL.
MAX_FETCH_BYTES = 100 * 1024 * 1024

#: ``GET /v1/account`` (``github_url`` and ``avatar_url`` left out: not nullable in the description).
ACCOUNT = {"type": "user", "username": "emulator", "name": "Kontext Emulator"}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h)?)+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_UPLOAD_PATH = re.compile(r"/v1/files/([A-Za-z0-9_-]+)")
_OUTPUT_PATH = re.compile(r"/files/([A-Za-z0-9_-]+)/([A-Za-z0-9_.-]+)")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_SWEEP_INTERVAL = 1.0
_POLL_STEP = 0.02
_PAGE_SIZE = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MODEL_CREATED = "2025-05-29T00:00:00Z"
_RECENT_REQUESTS = 50


class ProblemError(Exception):
    """An error answer: becomes an RFC 7807 ``application/problem+json`` response."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


class RequestRecord(NamedTuple):
    """One request the emulator saw: ``path`` is below the base URL; ``status`` is ``None`` when the
    connection was dropped without a response."""

    method: str
    path: str
    status: int | None


@dataclass(frozen=True)
class EmulatorConfig:
    """The emulator's options (see :class:`~airflow_provider_kontext.testing.KontextEmulator`)."""

    token: str | None = None
    path_prefix: str = ""
    timing: Timing = field(default_factory=Timing)
    output_scale: float = 1.0
    upload_ttl_seconds: float = 24 * 3600.0
    rate_limit: RateLimit | None = None
    timing_seed: int = 0
    webhook_secret: str | None = None


@dataclass(frozen=True)
class StoredFile:
    """A file uploaded with ``POST /v1/files``."""

    id: str
    name: str
    content_type: str
    data: bytes
    created_wall: float
    expires_wall: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self, base_url: str) -> dict[str, Any]:
        created = datetime.fromtimestamp(self.created_wall, timezone.utc)
        md5 = hashlib.md5(self.data, usedforsecurity=False).hexdigest()
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": len(self.data),
            "etag": md5,
            "checksums": {"sha256": hashlib.sha256(self.data).hexdigest(), "md5": md5},
            "metadata": dict(self.metadata),
            "created_at": _iso(created),
            "expires_at": _iso(created + timedelta(seconds=self.expires_wall - self.created_wall)),
            "urls": {"get": f"{base_url}/v1/files/{self.id}"},
        }


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def parse_prefer_wait(value: str | None) -> float | None:
    """Seconds to hold a create open from a ``Prefer`` header: ``wait`` is 60, ``wait=N`` is N
    (1..60); ``None`` without a wait preference.

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
    """Seconds from a ``Cancel-After`` header: ``90s``, ``5m``, ``1h30m``, ``500ms`` or plain seconds,
    at least :data:`MIN_CANCEL_AFTER_SECONDS`.

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


def _invalid(field_name: str, description: str) -> ProblemError:
    """A 422 for a request body that does not match the OpenAPI description."""
    return ProblemError(
        422,
        "Unprocessable Entity",
        f"{field_name}: {description}",
        extra={"invalid_fields": [{"type": "invalid", "field": field_name, "description": description}]},
    )


def check_create_body(document: dict[str, Any], *, by_version: bool) -> None:
    """Enforce the prediction request schema: only its keys, a URL ``webhook``, a list of known
    ``webhook_events_filter`` events, a boolean ``stream``.

    :raises ProblemError: 422 naming the field.
    """
    allowed = _VERSION_CREATE_KEYS if by_version else _MODEL_CREATE_KEYS
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise _invalid(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    if "stream" in document and not isinstance(document["stream"], bool):
        raise _invalid("stream", "must be a boolean")
    webhook = document.get("webhook")
    if webhook is not None:
        parts = urlsplit(webhook) if isinstance(webhook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise _invalid("webhook", "must be an HTTPS URL")
    events = document.get("webhook_events_filter")
    if events is not None and (
        not isinstance(events, list) or any(event not in WEBHOOK_EVENTS for event in events)
    ):
        raise _invalid("webhook_events_filter", f"must be a list of {', '.join(WEBHOOK_EVENTS)}")


def _micros(wall: float) -> int:
    """Unix time in whole microseconds (the precision of the timestamps the API shows)."""
    return round(wall * 1_000_000)


def _parse_time(name: str, value: str | None) -> int | None:
    """Unix microseconds of an ISO 8601 query parameter. :raises ProblemError: 400."""
    if value is None or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ProblemError(400, "Bad Request", f"{name}: {value!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _encode_cursor(created_wall: float, record_id: str, *, reverse: bool) -> str:
    text = f"p={created_wall!r}&i={record_id}" + ("&r=1" if reverse else "")
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


def _decode_cursor(cursor: str) -> tuple[float, str, bool]:
    """(created, id, reverse) of an opaque list cursor. :raises ProblemError: 400."""
    try:
        fields = dict(
            part.split("=", 1) for part in base64.urlsafe_b64decode(cursor.encode()).decode().split("&")
        )
        return float(fields["p"]), fields["i"], fields.get("r") == "1"
    except (ValueError, KeyError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(400, "Bad Request", "Invalid cursor") from None


class EmulatorService:
    """The emulator's state and endpoint logic."""

    def __init__(self, config: EmulatorConfig, faults: Faults, clock: Clock | None = None) -> None:
        self.config = config
        self.faults = faults
        self.clock = clock or Clock()
        self.port: int | None = None
        self.closing = False
        self._lock = threading.Lock()
        self._predictions: dict[str, PredictionRecord] = {}
        self._uploads: dict[str, StoredFile] = {}
        self._requests: list[RequestRecord] = []
        self._created = 0
        self._last_sweep = self.clock.monotonic()
        self._timing_rng = random.Random(config.timing_seed)
        self.limiter = RateLimiter(config.rate_limit, self.clock.monotonic) if config.rate_limit else None
        self.webhooks = WebhookSender(config.webhook_secret or new_secret(), self.clock.wall)
        #: Signs download URLs of uploaded files (``/v1/files/{id}/download``).
        self.files_secret = secrets.token_bytes(32)

    # --- introspection ----------------------------------------------------------------------

    @property
    def predictions(self) -> dict[str, PredictionRecord]:
        with self._lock:
            return dict(self._predictions)

    @property
    def created_count(self) -> int:
        with self._lock:
            return self._created

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def log_request(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self._requests.append(RequestRecord(method, path, status))

    def reset(self) -> None:
        """Forget predictions, uploads and the request log, and disarm every fault."""
        with self._lock:
            self._predictions.clear()
            self._uploads.clear()
            self._requests.clear()
            self._created = 0
            self._timing_rng.seed(self.config.timing_seed)
            if self.config.rate_limit is not None:
                self.limiter = RateLimiter(self.config.rate_limit, self.clock.monotonic)
        self.webhooks.clear()
        self.faults.clear()

    def state(self) -> dict[str, Any]:
        """Counts for ``GET /_emulator/state``."""
        now = self.clock.monotonic()
        with self._lock:
            records = list(self._predictions.values())
            requests = list(self._requests)
            created = self._created
            uploads = len(self._uploads)
        statuses = Counter(record.snapshot(record.elapsed(now)).status.value for record in records)
        responses = Counter("dropped" if r.status is None else str(r.status) for r in requests)
        timing = self.config.timing
        return {
            "created_count": created,
            "prediction_count": len(records),
            "statuses": dict(statuses),
            "upload_count": uploads,
            "request_count": len(requests),
            "responses": dict(responses),
            "recent_requests": [list(r) for r in requests[-_RECENT_REQUESTS:]],
            "faults": self.faults.describe(),
            "config": {
                "auth": self.config.token is not None,
                "path_prefix": self.config.path_prefix,
                "start_seconds": timing.start_seconds,
                "prediction_seconds": timing.prediction_seconds,
                "retention_seconds": timing.retention_seconds,
                "spread": timing.spread,
                "output_scale": self.config.output_scale,
                "rate_limit": self.config.rate_limit.name if self.config.rate_limit else None,
            },
            "webhook_deliveries": len(self.webhooks.deliveries),
        }

    # --- auth -------------------------------------------------------------------------------

    def check_auth(self, authorization: str | None) -> None:
        """:raises ProblemError: 401 when a token is configured and the header does not carry it."""
        token = self.config.token
        if token is None:
            return
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() in ("bearer", "token") and secrets.compare_digest(given.strip(), token):
            return
        raise ProblemError(
            401,
            "Unauthenticated",
            "You did not pass a valid authentication token",
            headers={"WWW-Authenticate": "Bearer"},
        )

    # --- predictions ------------------------------------------------------------------------

    async def create(
        self,
        *,
        base_url: str,
        model: str | None,
        body: bytes,
        prefer: str | None,
        cancel_after: str | None,
    ) -> tuple[int, dict[str, Any]]:
        """Create a prediction (``model`` is ``owner/name`` from the path, ``None`` for
        ``POST /v1/predictions``) and return the status code and JSON body to answer with."""
        document = self._json_object(body)
        check_create_body(document, by_version=model is None)
        model_name, version = self._resolve_model(model, document.get("version"))
        raw_input = document.get("input")
        if not isinstance(raw_input, dict):
            raise ProblemError(
                422,
                "Input validation failed",
                "input: field required (an object with the model's inputs)",
                extra={"invalid_fields": [{"field": "input", "description": "field required"}]},
            )
        try:
            model_input = validate_input(model_name, raw_input)
        except KontextInputError as exc:
            raise ProblemError(
                422,
                "Input validation failed",
                str(exc),
                extra={"invalid_fields": [{"field": f, "description": m} for f, m in exc.errors]},
            ) from None
        wait = parse_prefer_wait(prefer)
        deadline = parse_cancel_after(cancel_after)
        images_shape = self.faults.take_images_api_shape()
        with self._lock:
            timing = self.config.timing.draw(self._timing_rng)
        if images_shape:
            timing = replace(timing, start_seconds=0.0, prediction_seconds=0.0)
        options = input_model_for(model_name).model_validate(model_input)
        seed = getattr(options, "seed", None) or secrets.randbelow(65536)
        webhook = document.get("webhook")
        events = document.get("webhook_events_filter")
        record = PredictionRecord(
            id=new_id(),
            model=model_name,
            version=version,
            input=model_input,
            base_url=base_url,
            created_wall=round(self.clock.wall(), 6),  # what created_at shows, to the microsecond
            created_mono=self.clock.monotonic(),
            timing=timing,
            seed=seed,
            steps=int(getattr(options, "num_inference_steps", 28)),
            prompt=options.prompt,
            cancel_after=deadline,
            forced=self.faults.next_outcome(),
            webhook=webhook if isinstance(webhook, str) else None,
            webhook_events=frozenset(events) if events is not None else DEFAULT_WEBHOOK_EVENTS,
        )
        with self._lock:
            self._predictions[record.id] = record
            self._created += 1
        self._sweep()
        if images_shape:
            return await self._images_api_answer(record)
        if record.webhook is not None and record.webhook_events:
            self.webhooks.follow(
                record.id,
                record.webhook,
                record.webhook_events,
                lambda: self._json(record),
                closing=lambda: self.closing,
            )
        if wait is not None:
            await self._wait(record, self.clock.monotonic() + wait)
            answer = await self._json(record)
            if not record.is_terminal(record.elapsed(self.clock.monotonic())):
                return 201, starting_json(answer)
            return 201, answer
        return 201, await self._json(record)

    async def get(self, prediction_id: str) -> dict[str, Any]:
        """``GET /v1/predictions/{id}``."""
        return await self._json(self._record(prediction_id))

    async def cancel(self, prediction_id: str) -> dict[str, Any]:
        """``POST /v1/predictions/{id}/cancel``: a prediction not yet finished ends ``canceled`` now."""
        record = self._record(prediction_id)
        await self._ensure_edit(record)
        elapsed = record.elapsed(self.clock.monotonic())
        if not record.is_terminal(elapsed):
            record.canceled_at = elapsed
        return record.to_json(elapsed)

    async def list_predictions(
        self,
        base_url: str,
        *,
        cursor: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/predictions``: newest first, 100 a page, optionally only those created at or
        after ``created_after`` and before ``created_before``; ``next``/``previous`` are URLs with an
        opaque cursor. Like Replicate's list, the items carry no ``logs``.

        :raises ProblemError: 400 for a bad date-time or cursor.
        """
        after = _parse_time("created_after", created_after)
        before = _parse_time("created_before", created_before)
        with self._lock:
            records = [
                r
                for r in self._predictions.values()
                if (after is None or _micros(r.created_wall) >= after)
                and (before is None or _micros(r.created_wall) < before)
            ]
        records.sort(key=lambda r: (r.created_wall, r.id), reverse=True)
        keys = [(r.created_wall, r.id) for r in records]
        if cursor is None:
            start = 0
        else:
            position, record_id, reverse = _decode_cursor(cursor)
            if reverse:  # the page that ends just before (newer than) the given item
                end = sum(1 for key in keys if key > (position, record_id))
                start = max(0, end - _PAGE_SIZE)
            else:  # the page that starts just after (older than) the given item
                start = sum(1 for key in keys if key >= (position, record_id))
        page = records[start : start + _PAGE_SIZE]
        now = self.clock.monotonic()
        results = []
        for record in page:
            await self._ensure_edit(record)
            results.append(record.to_json(record.elapsed(now), logs=False))
        bounds = (("created_after", created_after), ("created_before", created_before))
        params = {name: value for name, value in bounds if value}

        def link(target: PredictionRecord, *, reverse: bool) -> str:
            query = {**params, "cursor": _encode_cursor(target.created_wall, target.id, reverse=reverse)}
            return f"{base_url}/v1/predictions?{urlencode(query)}"

        has_next = start + _PAGE_SIZE < len(records)
        return {
            "next": link(page[-1], reverse=False) if has_next and page else None,
            "previous": link(page[0], reverse=True) if start > 0 and page else None,
            "results": results,
        }

    async def current(self, prediction_id: str) -> Prediction:
        """The prediction as ``GET`` would show it now."""
        return await self._current(self._record(prediction_id))

    async def stream(self, prediction_id: str) -> AsyncIterator[str]:
        """``urls.stream``: the prediction's server-sent events, as Replicate sends them: ``logs``
        events with new log lines, an ``output`` event with the output, an ``error`` event when it
        failed, then ``done`` (data ``{}``, or ``{"reason": "canceled"}`` and the like).

        :raises ProblemError: 404 for an unknown prediction.
        """
        record = self._record(prediction_id)
        sent_logs = 0
        ids = itertools.count(1)
        while not self.closing:
            await self._ensure_edit(record)
            elapsed = record.elapsed(self.clock.monotonic())
            body = record.to_json(elapsed)
            logs = body.get("logs") or ""
            if len(logs) > sent_logs:
                for line in logs[sent_logs:].splitlines():
                    yield _event("logs", line, next(ids))
                sent_logs = len(logs)
            if record.is_terminal(elapsed):
                status = body["status"]
                if status == "succeeded" and body.get("output") is not None:
                    yield _event("output", str(body["output"]), next(ids))
                if status == "failed":
                    yield _event("error", str(body.get("error") or "failed"), next(ids))
                reason = {} if status == "succeeded" else {"reason": status}
                yield _event("done", json.dumps(reason), next(ids))
                return
            await asyncio.sleep(_POLL_STEP)

    # --- models -----------------------------------------------------------------------------

    def model(self, base_url: str, owner: str, name: str) -> dict[str, Any]:
        """``GET /v1/models/{owner}/{name}`` for the models the emulator serves. :raises ProblemError: 404."""
        model_name = self._served_model(owner, name)
        return {
            "url": f"{base_url}/models/{model_name}",
            "owner": owner,
            "name": name,
            "description": f"{model_name} as served by the offline Kontext emulator",
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "cover_image_url": None,
            "run_count": self.created_count,
            "is_official": True,
            "default_example": None,
            "latest_version": self._version_json(model_name),
        }

    def model_versions(self, owner: str, name: str) -> dict[str, Any]:
        """``GET /v1/models/{owner}/{name}/versions``: the one version each served model has."""
        model_name = self._served_model(owner, name)
        return {"next": None, "previous": None, "results": [self._version_json(model_name)]}

    def model_version(self, owner: str, name: str, version_id: str) -> dict[str, Any]:
        """``GET /v1/models/{owner}/{name}/versions/{id}``. :raises ProblemError: 404."""
        model_name = self._served_model(owner, name)
        if version_id != MODEL_VERSIONS[model_name]:
            raise ProblemError(404, "Not found", f"Version {version_id} of {model_name} not found")
        return self._version_json(model_name)

    @staticmethod
    def _served_model(owner: str, name: str) -> str:
        model_name = f"{owner}/{name}"
        if model_name not in INPUT_MODELS:
            served = ", ".join(sorted(INPUT_MODELS))
            detail = f"Model {model_name} not found (the emulator serves {served})"
            raise ProblemError(404, "Not found", detail)
        return model_name

    @staticmethod
    def _version_json(model_name: str) -> dict[str, Any]:
        schema = input_model_for(model_name).model_json_schema()
        return {
            "id": MODEL_VERSIONS[model_name],
            "created_at": _MODEL_CREATED,
            "cog_version": "0.14.0",
            "openapi_schema": {
                "openapi": "3.0.2",
                "info": {"title": "Cog", "version": "0.1.0"},
                "paths": {},
                "components": {
                    "schemas": {
                        "Input": {**schema, "title": "Input"},
                        "Output": {"type": "string", "format": "uri", "title": "Output"},
                    }
                },
            },
        }

    # --- webhooks ---------------------------------------------------------------------------

    def webhook_secret(self) -> dict[str, Any]:
        """``GET /v1/webhooks/default/secret``: the key webhooks are signed with."""
        return {"key": self.webhooks.secret}

    def web_page(self, prediction_id: str) -> str:
        """A small HTML page for the prediction's ``urls.web`` (the provider's extra link)."""
        record = self._record(prediction_id)
        prediction = record.to_prediction(record.elapsed(self.clock.monotonic()))
        image = (
            f'<img src="{escape(prediction.output)}" alt="output">'
            if isinstance(prediction.output, str)
            else ""
        )
        return (
            f"<!doctype html><html><head><title>Prediction {escape(record.id)}</title></head><body>"
            f"<h1>{escape(record.model)}</h1><p>Status: <b>{prediction.status.value}</b></p>"
            f"<p>Prompt: {escape(record.prompt)}</p>{image}<pre>{escape(prediction.logs or '')}</pre>"
            "</body></html>"
        )

    # --- files ------------------------------------------------------------------------------

    def upload(
        self,
        *,
        base_url: str,
        data: bytes,
        filename: str | None,
        content_type: str | None,
        metadata: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/files`` (``metadata`` is the form field's JSON text).

        :raises ProblemError: 413 for a file over 100 MB, 422 for metadata that is not a JSON object
            or a filename over 255 characters.
        """
        if len(data) > MAX_UPLOAD_BYTES:
            raise ProblemError(413, "Content Too Large", "Files must be less than 100MB in size")
        if filename is not None and len(filename) > 255:
            raise _invalid("filename", "must be at most 255 characters")
        try:
            meta = json.loads(metadata) if metadata else {}
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise _invalid("metadata", "must be a JSON object")
        now = self.clock.wall()
        stored = StoredFile(
            id=new_id(),
            name=filename or "file",
            content_type=content_type or "application/octet-stream",
            data=data,
            created_wall=now,
            expires_wall=now + self.config.upload_ttl_seconds,
            metadata=meta,
        )
        with self._lock:
            self._uploads[stored.id] = stored
        return stored.to_json(base_url)

    def uploaded_file(self, file_id: str) -> StoredFile:
        """An uploaded file that has not expired. :raises ProblemError: 404."""
        with self._lock:
            stored = self._uploads.get(file_id)
            if stored is not None and self.clock.wall() >= stored.expires_wall:
                del self._uploads[file_id]
                stored = None
        if stored is None:
            raise ProblemError(404, "Not found", "File not found")
        return stored

    def list_files(self, base_url: str) -> dict[str, Any]:
        """``GET /v1/files``: every file not expired, newest first (one page)."""
        wall = self.clock.wall()
        with self._lock:
            files = [f for f in self._uploads.values() if wall < f.expires_wall]
        files.sort(key=lambda f: (f.created_wall, f.id), reverse=True)
        return {"next": None, "previous": None, "results": [f.to_json(base_url) for f in files]}

    def delete_file(self, file_id: str) -> None:
        """``DELETE /v1/files/{id}``. :raises ProblemError: 404."""
        self.uploaded_file(file_id)
        with self._lock:
            self._uploads.pop(file_id, None)

    def download_url(self, base_url: str, file_id: str, *, lifetime: float = 3600.0) -> str:
        """A signed ``/v1/files/{id}/download`` URL, as Replicate hands out for a file's bytes."""
        expiry = int(self.clock.wall() + lifetime)
        signature = self._file_signature(file_id, expiry)
        query = {"owner": ACCOUNT["username"], "expiry": expiry, "signature": signature}
        return f"{base_url}/v1/files/{file_id}/download?{urlencode(query)}"

    def download(self, file_id: str, owner: str, expiry: str, signature: str) -> StoredFile:
        """``GET /v1/files/{id}/download``: the bytes, for a valid signature that has not expired.

        :raises ProblemError: 404 otherwise (Replicate does not say which part was wrong).
        """
        try:
            expires = int(expiry)
        except ValueError:
            expires = 0
        valid = (
            owner == ACCOUNT["username"]
            and expires > self.clock.wall()
            and hmac.compare_digest(signature, self._file_signature(file_id, expires))
        )
        if not valid:
            raise ProblemError(404, "Not found", "File not found")
        return self.uploaded_file(file_id)

    def _file_signature(self, file_id: str, expiry: int) -> str:
        message = f"{ACCOUNT['username']} {file_id} {expiry}".encode()
        return base64.b64encode(hmac.new(self.files_secret, message, hashlib.sha256).digest()).decode()

    def output_file(self, prediction_id: str, filename: str) -> tuple[bytes, str]:
        """The bytes and content type of a succeeded prediction's output, until retention ends.

        :raises ProblemError: 404.
        """
        with self._lock:
            record = self._predictions.get(prediction_id)
        missing = ProblemError(404, "Not found", f"Output file {prediction_id}/{filename} not found")
        if (
            record is None
            or record.edit is None
            or record.purged
            or filename != f"output.{record.edit.extension}"
        ):
            raise missing
        snap = record.snapshot(record.elapsed(self.clock.monotonic()))
        if snap.status is not PredictionStatus.SUCCEEDED:
            raise missing
        if snap.data_removed:
            self._purge(record)
            raise ProblemError(
                404, "Not found", f"Output file {prediction_id}/{filename} was deleted (retention)"
            )
        return record.edit.data, record.edit.content_type

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _json_object(body: bytes) -> dict[str, Any]:
        try:
            document = json.loads(body) if body else None
        except ValueError as exc:
            raise ProblemError(400, "Bad Request", f"The request body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ProblemError(400, "Bad Request", "The request body must be a JSON object")
        return document

    @staticmethod
    def _resolve_model(model: str | None, version: Any) -> tuple[str, str]:
        """(model, version) of a create; unknown versions mean flux-kontext-dev."""
        if model is not None:
            if model not in INPUT_MODELS:
                served = ", ".join(sorted(INPUT_MODELS))
                raise ProblemError(
                    404, "Not found", f"Model {model} not found (the emulator serves {served})"
                )
            return model, "hidden"
        if not isinstance(version, str) or not version.strip():
            raise ProblemError(
                422,
                "Input validation failed",
                "version: field required ('owner/name:hash' or a version hash)",
                extra={"invalid_fields": [{"field": "version", "description": "field required"}]},
            )
        name, _, version_id = version.strip().partition(":")
        if "/" in name:
            model_name = name if name in INPUT_MODELS else DEFAULT_MODEL
            return model_name, version_id or MODEL_VERSIONS[model_name]
        return _VERSION_MODELS.get(name, DEFAULT_MODEL), name

    def _record(self, prediction_id: str) -> PredictionRecord:
        with self._lock:
            record = self._predictions.get(prediction_id)
        if record is None:
            raise ProblemError(404, "Not found", f"Prediction {prediction_id} not found")
        return record

    async def _current(self, record: PredictionRecord) -> Prediction:
        await self._ensure_edit(record)
        return record.to_prediction(record.elapsed(self.clock.monotonic()))

    async def _json(self, record: PredictionRecord) -> dict[str, Any]:
        await self._ensure_edit(record)
        return record.to_json(record.elapsed(self.clock.monotonic()))

    async def _wait(self, record: PredictionRecord, deadline: float) -> None:
        """Hold until the prediction is terminal or ``deadline`` (monotonic) passes."""
        while not self.closing:
            await self._ensure_edit(record)
            now = self.clock.monotonic()
            if now >= deadline or record.is_terminal(record.elapsed(now)):
                return
            await asyncio.sleep(min(_POLL_STEP, deadline - now))

    async def _images_api_answer(self, record: PredictionRecord) -> tuple[int, dict[str, Any]]:
        prediction = await self._current(record)
        if prediction.status is PredictionStatus.SUCCEEDED:
            return 200, {"created": int(record.created_wall), "data": [{"url": prediction.output}]}
        status = 400 if record.edit_error is not None else 500
        raise ProblemError(status, "Prediction failed", str(prediction.error or prediction.status.value))

    async def _ensure_edit(self, record: PredictionRecord) -> None:
        """Start the edit (once) when processing has started; wait for it only when the prediction
        is due to end, so polls during processing answer at once."""
        elapsed = record.elapsed(self.clock.monotonic())
        if not record.needs_edit(elapsed):
            return
        if record.edit_task is None:
            record.edit_task = asyncio.ensure_future(self._run_edit(record))
        due = record.timing.start_seconds + record.timing.prediction_seconds
        if elapsed >= due and not record.is_terminal(elapsed):
            await asyncio.shield(record.edit_task)

    async def _run_edit(self, record: PredictionRecord) -> None:
        options = input_model_for(record.model).model_validate(record.input)
        image_ref = getattr(options, "input_image", None)
        try:
            source = await self._load_image(image_ref) if image_ref else None
            record.edit = await asyncio.to_thread(
                edit_image,
                source,
                prompt=record.prompt,
                seed=record.seed,
                aspect_ratio=str(getattr(options, "aspect_ratio", "match_input_image")),
                output_format=str(getattr(options, "output_format", "webp")),
                output_quality=int(getattr(options, "output_quality", 95)),
                scale=self.config.output_scale,
            )
        except ImageError as exc:
            record.edit_error = str(exc)
        except Exception as exc:  # the prediction must end rather than hang on an emulator bug
            record.edit_error = f"The emulator could not run the edit: {type(exc).__name__}: {exc}"
        finally:
            record.edit_done_at = record.elapsed(self.clock.monotonic())

    async def _load_image(self, reference: str) -> bytes:
        """The bytes ``input_image`` refers to: a data: URI, one of this emulator's files (read in
        memory), or an http(s)://127.0.0.1 URL. The emulator is offline: nothing else is fetched."""
        if reference.startswith("data:"):
            return decode_data_uri(reference)
        parts = urlsplit(reference)
        local = self._local_file(parts)
        if local is not None:
            return local
        if parts.scheme not in ("http", "https") or parts.hostname != "127.0.0.1":
            where = parts.hostname or reference[:40]
            raise ImageError(
                f"The Kontext emulator is offline and does not download from {where!r}: "
                "pass input_image as a data: URI, a file uploaded to the emulator (POST /v1/files), "
                "or an http://127.0.0.1 URL"
            )
        return await _fetch_local(reference)

    def _local_file(self, parts: SplitResult) -> bytes | None:
        """The bytes of one of this emulator's own URLs, or ``None`` if it is not one."""
        if parts.hostname not in _LOCAL_HOSTS or self.port is None or parts.port != self.port:
            return None
        prefix = self.config.path_prefix
        if prefix and not parts.path.startswith(prefix + "/"):
            return None
        path = parts.path[len(prefix) :]
        try:
            if match := _UPLOAD_PATH.fullmatch(path):
                return self.uploaded_file(match.group(1)).data
            if match := _OUTPUT_PATH.fullmatch(path):
                return self.output_file(match.group(1), match.group(2))[0]
        except ProblemError as exc:
            raise ImageError(f"input_image could not be read: {exc.detail}") from None
        return None

    def _purge(self, record: PredictionRecord) -> None:
        if record.edit is not None and not record.purged:
            record.edit = replace(record.edit, data=b"")
            record.purged = True

    def _sweep(self) -> None:
        """Free the bytes of outputs and uploads past retention (at most once a second)."""
        now = self.clock.monotonic()
        if now - self._last_sweep < _SWEEP_INTERVAL:
            return
        self._last_sweep = now
        wall = self.clock.wall()
        with self._lock:
            records = list(self._predictions.values())
            for file_id in [i for i, f in self._uploads.items() if wall >= f.expires_wall]:
                del self._uploads[file_id]
        retention = self.config.timing.retention_seconds
        for record in records:
            if record.edit is None or record.purged:
                continue
            ending = record.known_ending()
            if ending is not None and record.elapsed(now) >= ending.at + retention:
                self._purge(record)


def _event(name: str, data: str, event_id: int) -> str:
    """One server-sent event (multi-line data as several ``data:`` lines) with its ``id``, which
    the official clients require before they hand an event on."""
    lines = "".join(f"data: {line}\n" for line in (data.splitlines() or [""]))
    return f"event: {name}\nid: {event_id}\n{lines}\n"


async def _fetch_local(url: str) -> bytes:
    """GET an http(s)://127.0.0.1 URL directly (no proxy from the environment, no redirects)."""
    import httpx

    chunks: list[bytes] = []
    size = 0
    try:
        async with (
            httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=10.0) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise ImageError(f"input_image could not be downloaded: HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_FETCH_BYTES:
                    raise ImageError(f"input_image is larger than {MAX_FETCH_BYTES} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ImageError(f"input_image could not be downloaded: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)
