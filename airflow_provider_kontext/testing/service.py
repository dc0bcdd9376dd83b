"""What the emulator does for each API call, independent of the web framework that serves it.

:class:`EmulatorService` holds the state (predictions, uploads, the request log, the armed faults)
and implements the endpoints as methods that return JSON-ready data or raise :class:`ProblemError`.
``emulator.py`` only maps HTTP onto these methods. The methods run on the server's event loop; the
state is guarded by a lock so tests can inspect and reset it from their own thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

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
from airflow_provider_kontext.testing.lifecycle import PredictionRecord, Timing, new_id

#: Fake version ids of the models the emulator serves (64 hex characters, like Replicate's).
MODEL_VERSIONS: dict[str, str] = {
    model: hashlib.sha256(f"kontext-emulator:{model}".encode()).hexdigest() for model in INPUT_MODELS
}
_VERSION_MODELS = {version: model for model, version in MODEL_VERSIONS.items()}

#: The longest ``Prefer: wait`` Replicate honours.
MAX_WAIT_SECONDS = 60.0
#: Largest accepted upload, like Replicate's client-side limit.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
#: Largest input image fetched from an http://127.0.0.1 URL.
MAX_FETCH_BYTES = 100 * 1024 * 1024

ACCOUNT = {"type": "user", "username": "emulator", "name": "Kontext Emulator", "github_url": None}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h)?)+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_UPLOAD_PATH = re.compile(r"/v1/files/([A-Za-z0-9_-]+)")
_OUTPUT_PATH = re.compile(r"/files/([A-Za-z0-9_-]+)/([A-Za-z0-9_.-]+)")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_SWEEP_INTERVAL = 1.0
_POLL_STEP = 0.02
_PAGE_SIZE = 100
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


@dataclass(frozen=True)
class StoredFile:
    """A file uploaded with ``POST /v1/files``."""

    id: str
    name: str
    content_type: str
    data: bytes
    created_wall: float
    expires_wall: float

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
            "metadata": {},
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
    """Seconds from a ``Cancel-After`` header: ``90s``, ``5m``, ``1h30m``, ``500ms`` or plain seconds.

    :raises ProblemError: 400 for anything else.
    """
    if value is None or not value.strip():
        return None
    text = value.strip().lower().replace(" ", "")
    if not _DURATION.fullmatch(text):
        raise ProblemError(
            400, "Bad Request", f"Cancel-After: {value!r} is not a duration like '90s', '5m' or '120'"
        )
    return sum(float(number) * _UNIT_SECONDS[unit or None] for number, unit in _DURATION_PART.findall(text))


class EmulatorService:
    """The emulator's state and endpoint logic."""

    def __init__(self, config: EmulatorConfig, faults: Faults) -> None:
        self.config = config
        self.faults = faults
        self.port: int | None = None
        self.closing = False
        self._lock = threading.Lock()
        self._predictions: dict[str, PredictionRecord] = {}
        self._uploads: dict[str, StoredFile] = {}
        self._requests: list[RequestRecord] = []
        self._created = 0
        self._last_sweep = time.monotonic()

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
        self.faults.clear()

    def state(self) -> dict[str, Any]:
        """Counts for ``GET /_emulator/state``."""
        now = time.monotonic()
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
                "output_scale": self.config.output_scale,
            },
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
        timing = self.config.timing
        if images_shape:
            timing = replace(timing, start_seconds=0.0, prediction_seconds=0.0)
        options = input_model_for(model_name).model_validate(model_input)
        seed = getattr(options, "seed", None) or secrets.randbelow(65536)
        webhook = document.get("webhook")
        record = PredictionRecord(
            id=new_id(),
            model=model_name,
            version=version,
            input=model_input,
            base_url=base_url,
            created_wall=time.time(),
            created_mono=time.monotonic(),
            timing=timing,
            seed=seed,
            steps=int(getattr(options, "num_inference_steps", 28)),
            prompt=options.prompt,
            cancel_after=deadline,
            forced=self.faults.next_outcome(),
            webhook=webhook if isinstance(webhook, str) else None,
        )
        with self._lock:
            self._predictions[record.id] = record
            self._created += 1
        self._sweep()
        if images_shape:
            return await self._images_api_answer(record)
        if wait is not None:
            await self._wait(record, record.created_mono + wait)
        prediction = await self._current(record)
        return 201, prediction.model_dump(mode="json")

    async def get(self, prediction_id: str) -> dict[str, Any]:
        """``GET /v1/predictions/{id}``."""
        prediction = await self._current(self._record(prediction_id))
        return prediction.model_dump(mode="json")

    async def cancel(self, prediction_id: str) -> dict[str, Any]:
        """``POST /v1/predictions/{id}/cancel``: a prediction not yet finished ends ``canceled`` now."""
        record = self._record(prediction_id)
        await self._ensure_edit(record)
        elapsed = record.elapsed(time.monotonic())
        if not record.is_terminal(elapsed):
            record.canceled_at = elapsed
        return record.to_prediction(elapsed).model_dump(mode="json")

    async def list_predictions(self, base_url: str, cursor: int) -> dict[str, Any]:
        """``GET /v1/predictions``: newest first, 100 a page."""
        with self._lock:
            records = sorted(self._predictions.values(), key=lambda r: r.created_mono, reverse=True)
        page = records[cursor : cursor + _PAGE_SIZE]
        results = [(await self._current(record)).model_dump(mode="json") for record in page]
        after = cursor + _PAGE_SIZE
        return {
            "previous": f"{base_url}/v1/predictions?cursor={max(0, cursor - _PAGE_SIZE)}" if cursor else None,
            "next": f"{base_url}/v1/predictions?cursor={after}" if after < len(records) else None,
            "results": results,
        }

    async def current(self, prediction_id: str) -> Prediction:
        """The prediction as ``GET`` would show it now."""
        return await self._current(self._record(prediction_id))

    def web_page(self, prediction_id: str) -> str:
        """A small HTML page for the prediction's ``urls.web`` (the provider's extra link)."""
        record = self._record(prediction_id)
        prediction = record.to_prediction(record.elapsed(time.monotonic()))
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
        self, *, base_url: str, data: bytes, filename: str | None, content_type: str | None
    ) -> dict[str, Any]:
        """``POST /v1/files``."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise ProblemError(413, "Payload Too Large", f"files are limited to {MAX_UPLOAD_BYTES} bytes")
        now = time.time()
        stored = StoredFile(
            id=new_id(),
            name=filename or "file",
            content_type=content_type or "application/octet-stream",
            data=data,
            created_wall=now,
            expires_wall=now + self.config.upload_ttl_seconds,
        )
        with self._lock:
            self._uploads[stored.id] = stored
        return stored.to_json(base_url)

    def uploaded_file(self, file_id: str) -> StoredFile:
        """An uploaded file that has not expired. :raises ProblemError: 404."""
        with self._lock:
            stored = self._uploads.get(file_id)
            if stored is not None and time.time() >= stored.expires_wall:
                del self._uploads[file_id]
                stored = None
        if stored is None:
            raise ProblemError(404, "Not found", f"File {file_id} not found (never uploaded, or expired)")
        return stored

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
        snap = record.snapshot(record.elapsed(time.monotonic()))
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
        return record.to_prediction(record.elapsed(time.monotonic()))

    async def _wait(self, record: PredictionRecord, deadline: float) -> None:
        """Hold until the prediction is terminal or ``deadline`` (monotonic) passes."""
        while not self.closing:
            await self._ensure_edit(record)
            now = time.monotonic()
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
        elapsed = record.elapsed(time.monotonic())
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
            record.edit_done_at = record.elapsed(time.monotonic())

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
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_INTERVAL:
            return
        self._last_sweep = now
        wall = time.time()
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
