"""Predictions: create, get, list, cancel, stream, and what their URLs serve (output file, web page).

:class:`PredictionStore` answers ``POST /v1/models/{owner}/{name}/predictions``,
``POST /v1/predictions``, ``GET /v1/predictions[/{id}]``, ``POST /v1/predictions/{id}/cancel``,
``urls.stream`` (``stream.py``), the output files ``/files/{id}/output.<ext>`` and the web page
``/p/{id}``. A create is checked first (``create_request.py``, ``model_catalog.py``) so a rejected
one stores nothing; a prediction's life is then computed from the time since its creation
(``lifecycle.py``), its edit runs in the background (``edit_runner.py``), and outputs past
retention are freed. Errors are :class:`~airflow_provider_kontext.testing.problems.ProblemError`.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult

from airflow_provider_kontext.models import Prediction, PredictionStatus, input_model_for
from airflow_provider_kontext.testing.create_request import (
    check_create_body,
    model_input,
    parse_cancel_after,
    parse_prefer_wait,
)
from airflow_provider_kontext.testing.edit_runner import EditRunner
from airflow_provider_kontext.testing.imaging import ImageError
from airflow_provider_kontext.testing.lifecycle import PredictionRecord, new_id, starting_json
from airflow_provider_kontext.testing.listing import page_of
from airflow_provider_kontext.testing.model_catalog import resolve_model
from airflow_provider_kontext.testing.problems import ProblemError, json_object
from airflow_provider_kontext.testing.stream import POLL_STEP, stream_events
from airflow_provider_kontext.testing.webhooks import DEFAULT_WEBHOOK_EVENTS

if TYPE_CHECKING:
    from airflow_provider_kontext.testing.config import EmulatorConfig
    from airflow_provider_kontext.testing.faults import Faults
    from airflow_provider_kontext.testing.files import FileStore
    from airflow_provider_kontext.testing.lifecycle import Clock
    from airflow_provider_kontext.testing.webhooks import WebhookSender

_UPLOAD_PATH = re.compile(r"/v1/files/([A-Za-z0-9_-]+)")
_OUTPUT_PATH = re.compile(r"/files/([A-Za-z0-9_-]+)/([A-Za-z0-9_.-]+)")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_SWEEP_INTERVAL = 1.0


class PredictionStore:
    """The predictions and their endpoints; the state is safe to read from any thread.

    The endpoint methods run on the server's event loop.

    :param config: the emulator's options.
    :param faults: the armed faults (forced outcomes, the Images API shape of a create).
    :param clock: the emulator's clock.
    :param files: the uploaded files (an ``input_image`` may name one; expired ones are swept).
    :param webhooks: sends the webhooks a create asks for.
    """

    def __init__(
        self,
        config: EmulatorConfig,
        faults: Faults,
        clock: Clock,
        files: FileStore,
        webhooks: WebhookSender,
    ) -> None:
        self._config = config
        self._faults = faults
        self._clock = clock
        self._files = files
        self._webhooks = webhooks
        self._edits = EditRunner(clock, config.output_scale, self._own_url)
        self._lock = threading.Lock()
        self._records: dict[str, PredictionRecord] = {}
        self._created = 0
        self._timing_rng = random.Random(config.timing_seed)
        self._last_sweep = clock.monotonic()
        #: The port the server listens on (to read the emulator's own URLs from memory).
        self.port: int | None = None
        #: Set while the server stops: waits and streams end at once.
        self.closing = False

    # --- state ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, PredictionRecord]:
        """Return every prediction by id (a copy of the dict)."""
        with self._lock:
            return dict(self._records)

    @property
    def created_count(self) -> int:
        """Return how many predictions were really created."""
        with self._lock:
            return self._created

    def clear(self) -> None:
        """Forget every prediction and restart the timing RNG from its seed."""
        with self._lock:
            self._records.clear()
            self._created = 0
            self._timing_rng.seed(self._config.timing_seed)

    # --- endpoints --------------------------------------------------------------------------

    async def create(
        self,
        *,
        base_url: str,
        model: str | None,
        body: bytes,
        prefer: str | None,
        cancel_after: str | None,
    ) -> tuple[int, dict[str, Any]]:
        """Create a prediction and return the status code and JSON body to answer with.

        ``model`` is ``owner/name`` from the path, ``None`` for ``POST /v1/predictions``. With
        ``Prefer: wait`` the answer waits until the prediction ends or the wait runs out.

        :raises ProblemError: 400 for a bad body or header, 404 for an unknown model, 422 for a
            body or input that does not match the schema; nothing is stored then.
        """
        document = json_object(body)
        check_create_body(document, by_version=model is None)
        model_name, version = resolve_model(model, document.get("version"))
        inputs = model_input(model_name, document)
        wait = parse_prefer_wait(prefer)
        deadline = parse_cancel_after(cancel_after)
        images_shape = self._faults.take_images_api_shape()
        with self._lock:
            timing = self._config.timing.draw(self._timing_rng)
        if images_shape:
            timing = replace(timing, start_seconds=0.0, prediction_seconds=0.0)
        options = input_model_for(model_name).model_validate(inputs)
        seed = getattr(options, "seed", None) or secrets.randbelow(65536)
        webhook = document.get("webhook")
        events = document.get("webhook_events_filter")
        record = PredictionRecord(
            id=new_id(),
            model=model_name,
            version=version,
            input=inputs,
            base_url=base_url,
            created_wall=round(self._clock.wall(), 6),  # what created_at shows, to the microsecond
            created_mono=self._clock.monotonic(),
            timing=timing,
            seed=seed,
            steps=int(getattr(options, "num_inference_steps", 28)),
            prompt=options.prompt,
            cancel_after=deadline,
            forced=self._faults.next_outcome(),
            webhook=webhook if isinstance(webhook, str) else None,
            webhook_events=frozenset(events) if events is not None else DEFAULT_WEBHOOK_EVENTS,
        )
        with self._lock:
            self._records[record.id] = record
            self._created += 1
        self._sweep()
        if images_shape:
            return await self._images_api_answer(record)
        if record.webhook is not None and record.webhook_events:
            self._webhooks.follow(
                record.id,
                record.webhook,
                record.webhook_events,
                lambda: self._json(record),
                closing=lambda: self.closing,
            )
        if wait is not None:
            await self._wait(record, self._clock.monotonic() + wait)
            answer = await self._json(record)
            if not record.is_terminal(record.elapsed(self._clock.monotonic())):
                return 201, starting_json(answer)
            return 201, answer
        return 201, await self._json(record)

    async def get(self, prediction_id: str) -> dict[str, Any]:
        """Answer ``GET /v1/predictions/{id}``. :raises ProblemError: 404 for an unknown id."""
        return await self._json(self._record(prediction_id))

    async def current(self, prediction_id: str) -> Prediction:
        """Return the prediction as ``GET`` would show it now. :raises ProblemError: 404."""
        record = self._record(prediction_id)
        await self._edits.ensure(record)
        return record.to_prediction(record.elapsed(self._clock.monotonic()))

    async def cancel(self, prediction_id: str) -> dict[str, Any]:
        """Answer ``POST /v1/predictions/{id}/cancel``: a prediction not yet finished ends ``canceled``.

        :raises ProblemError: 404 for an unknown id.
        """
        record = self._record(prediction_id)
        await self._edits.ensure(record)
        elapsed = record.elapsed(self._clock.monotonic())
        if not record.is_terminal(elapsed):
            record.canceled_at = elapsed
        return record.to_json(elapsed)

    async def listing(
        self,
        base_url: str,
        *,
        cursor: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> dict[str, Any]:
        """Answer ``GET /v1/predictions``: one page (see ``listing.py``), items without ``logs``.

        :raises ProblemError: 400 for a bad date-time or cursor.
        """
        page, links = page_of(
            self.snapshot().values(),
            base_url,
            cursor=cursor,
            created_after=created_after,
            created_before=created_before,
        )
        now = self._clock.monotonic()
        results = []
        for record in page:
            await self._edits.ensure(record)
            results.append(record.to_json(record.elapsed(now), logs=False))
        return {**links, "results": results}

    async def stream(self, prediction_id: str) -> AsyncIterator[str]:
        """Answer ``urls.stream`` with the prediction's server-sent events (see ``stream.py``).

        :raises ProblemError: 404 for an unknown prediction, when the first event is awaited.
        """
        record = self._record(prediction_id)
        async for event in stream_events(record, self._clock, self._edits.ensure, lambda: self.closing):
            yield event

    def output_file(self, prediction_id: str, filename: str) -> tuple[bytes, str]:
        """Return the bytes and content type of a succeeded prediction's output, until retention ends.

        :raises ProblemError: 404 for an unknown prediction or file, or an output past retention.
        """
        with self._lock:
            record = self._records.get(prediction_id)
        missing = ProblemError(404, "Not found", f"Output file {prediction_id}/{filename} not found")
        if (
            record is None
            or record.edit is None
            or record.purged
            or filename != f"output.{record.edit.extension}"
        ):
            raise missing
        snap = record.snapshot(record.elapsed(self._clock.monotonic()))
        if snap.status is not PredictionStatus.SUCCEEDED:
            raise missing
        if snap.data_removed:
            _purge(record)
            raise ProblemError(
                404, "Not found", f"Output file {prediction_id}/{filename} was deleted (retention)"
            )
        return record.edit.data, record.edit.content_type

    def web_page(self, prediction_id: str) -> str:
        """Return a small HTML page for the prediction's ``urls.web`` (the provider's extra link).

        :raises ProblemError: 404 for an unknown prediction.
        """
        record = self._record(prediction_id)
        prediction = record.to_prediction(record.elapsed(self._clock.monotonic()))
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

    # --- internals --------------------------------------------------------------------------

    def _record(self, prediction_id: str) -> PredictionRecord:
        """Return the record of a prediction. :raises ProblemError: 404 for an unknown id."""
        with self._lock:
            record = self._records.get(prediction_id)
        if record is None:
            raise ProblemError(404, "Not found", f"Prediction {prediction_id} not found")
        return record

    async def _json(self, record: PredictionRecord) -> dict[str, Any]:
        """Return the prediction's JSON as of now, its edit started or awaited as due."""
        await self._edits.ensure(record)
        return record.to_json(record.elapsed(self._clock.monotonic()))

    async def _wait(self, record: PredictionRecord, deadline: float) -> None:
        """Hold until the prediction is terminal or ``deadline`` (monotonic) passes."""
        while not self.closing:
            await self._edits.ensure(record)
            now = self._clock.monotonic()
            if now >= deadline or record.is_terminal(record.elapsed(now)):
                return
            await asyncio.sleep(min(POLL_STEP, deadline - now))

    async def _images_api_answer(self, record: PredictionRecord) -> tuple[int, dict[str, Any]]:
        """Answer a create the way the Images API does (the ``images_api_shape`` fault).

        :raises ProblemError: 400 for a bad input image, 500 for any other failure.
        """
        await self._edits.ensure(record)
        prediction = record.to_prediction(record.elapsed(self._clock.monotonic()))
        if prediction.status is PredictionStatus.SUCCEEDED:
            return 200, {"created": int(record.created_wall), "data": [{"url": prediction.output}]}
        status = 400 if record.edit_error is not None else 500
        raise ProblemError(status, "Prediction failed", str(prediction.error or prediction.status.value))

    def _own_url(self, parts: SplitResult) -> bytes | None:
        """Return the bytes behind one of this emulator's own URLs, ``None`` if it is not one.

        :raises ImageError: for an own URL whose file or output is gone.
        """
        if parts.hostname not in _LOCAL_HOSTS or self.port is None or parts.port != self.port:
            return None
        prefix = self._config.path_prefix
        if prefix and not parts.path.startswith(prefix + "/"):
            return None
        path = parts.path[len(prefix) :]
        try:
            if match := _UPLOAD_PATH.fullmatch(path):
                return self._files.get(match.group(1)).data
            if match := _OUTPUT_PATH.fullmatch(path):
                return self.output_file(match.group(1), match.group(2))[0]
        except ProblemError as exc:
            raise ImageError(f"input_image could not be read: {exc.detail}") from None
        return None

    def _sweep(self) -> None:
        """Free the bytes of outputs and uploads past retention (at most once a second)."""
        now = self._clock.monotonic()
        if now - self._last_sweep < _SWEEP_INTERVAL:
            return
        self._last_sweep = now
        records = list(self.snapshot().values())
        self._files.drop_expired()
        retention = self._config.timing.retention_seconds
        for record in records:
            if record.edit is None or record.purged:
                continue
            ending = record.known_ending()
            if ending is not None and record.elapsed(now) >= ending.at + retention:
                _purge(record)


def _purge(record: PredictionRecord) -> None:
    """Drop the bytes of a prediction's output (retention is over)."""
    if record.edit is not None and not record.purged:
        record.edit = replace(record.edit, data=b"")
        record.purged = True
