"""Create a batch's predictions: paced, each recorded before and after; find creates whose answer was lost.

The batch operator (:mod:`airflow_provider_kontext.operators.batch`) tells the story; these steps do
the creating with the single edit's pieces (request checks, image sending) and record each image's
state in the :class:`~airflow_provider_kontext.edits.batch_ledger.BatchLedger`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

from airflow_provider_kontext.edits.batch_items import image_ref, listed_identity
from airflow_provider_kontext.edits.batch_ledger import (
    CREATED,
    CREATING,
    PROGRESS_SECONDS,
    BatchLedger,
    identity_key,
)
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextError,
    FluxKontextInputError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextTLSError,
)
from airflow_provider_kontext.hooks.retry import refused_create

if TYPE_CHECKING:
    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

#: Created predictions not yet written with a "creating" mark are written at least this often.
FLUSH_SECONDS = 1.0
#: How long before its paced turn a create's "creating" mark is written (with those queued behind).
MARK_LEAD_SECONDS = 0.1
#: A batch's orphan search looks this far before the earliest lost create (worker clock).
ORPHAN_MARGIN = timedelta(minutes=5)


class CreatingTask(Protocol):
    """What creating a batch needs of its operator: the model, its inputs, the pace, the hook."""

    model: str
    extra_input: dict[str, Any] | None
    inline_image_max_bytes: int
    creates_per_minute: float
    max_concurrent_creates: int

    @property
    def hook(self) -> FluxKontextHook:
        """Return the hook of the batch's connection."""

    def _model_arguments(self) -> dict[str, Any]: ...


class Pacer:
    """Space calls evenly at ``per_minute`` across threads."""

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Return this caller's slot (``time.monotonic()`` time; handed out in call order)."""
        with self._lock:
            slot = max(self._next, time.monotonic())
            self._next = slot + self.interval
        return slot

    def wait(self) -> None:
        """Block until this caller's slot comes."""
        sleep_until(self.reserve())


def sleep_until(moment: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``moment`` (at once if it has)."""
    if (left := moment - time.monotonic()) > 0:
        time.sleep(left)


class BatchCreator:
    """Create the batch's predictions a few at a time, paced, each recorded before and after."""

    def __init__(
        self, op: CreatingTask, ledger: BatchLedger, *, timeout: float, log: Any, seed_from: str | None = None
    ):
        self.op = op
        self.seed_from = seed_from
        self.ledger = ledger
        self.timeout = timeout
        self.log = log
        #: Why creating stopped for every image (the same answer awaits each), if it did.
        self.abort: str | None = None
        #: Why an image's create failed, by index.
        self.errors: dict[int, str] = {}
        self.created = 0
        self._lock = threading.Lock()

    def create(self, items: list[BatchItem], indices: list[int]) -> None:
        """Create the predictions of the images at ``indices``, logging progress and flushing the ledger.

        A failed create is recorded in :attr:`errors` (and :attr:`abort` when every other create
        would get the same answer); nothing is raised.
        """
        pacer = Pacer(self.op.creates_per_minute)
        started = time.monotonic()
        logged = flushed = started
        with ThreadPoolExecutor(self.op.max_concurrent_creates, thread_name_prefix="kontext-create") as pool:
            index_of = {pool.submit(self._one, items[index], pacer): index for index in indices}
            waiting = set(index_of)
            while waiting:
                done, waiting = wait(waiting, timeout=PROGRESS_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    if (exc := future.exception()) is not None:  # unforeseen: its entry tells the retry
                        self.log.error("Image %d: the create step failed: %r", index_of[future], exc)
                        with self._lock:
                            self.errors[index_of[future]] = self.op.hook.redact(
                                f"the create step failed: {exc!r}"
                            )[:300]
                if time.monotonic() - flushed >= FLUSH_SECONDS:
                    flushed = time.monotonic()
                    self.ledger.flush()
                if time.monotonic() - logged >= PROGRESS_SECONDS and waiting:
                    logged = time.monotonic()
                    self._report(len(indices))
        self.ledger.flush()
        self._report(len(indices), took=time.monotonic() - started)

    def _report(self, total: int, took: float | None = None) -> None:
        self.log.info(
            "Batch: created %d of %d predictions%s%s",
            self.created,
            total,
            f", {len(self.errors)} creates failed" if self.errors else "",
            f" in {took:.1f}s" if took is not None else "",
        )

    def _one(self, item: BatchItem, pacer: Pacer) -> None:
        index = item.position
        if self.abort:
            return
        try:
            request, model_input, sent_image = self._prepared(item)
        except FluxKontextInputError as exc:
            self.ledger.put(index, s="rejected", fp=item.fingerprint[:16], e=self._redact(exc))
            return
        except (FluxKontextError, OSError) as exc:
            self._failed(index, exc, "upload")
            return
        key = identity_key(item.prompt, image_ref(model_input["input_image"], sent_image))
        fingerprint = request.fingerprint[:16]
        slot = pacer.reserve()
        mark = self.ledger.put(index, flush=False, s=CREATING, fp=fingerprint, k=key, c=time.time())
        # Stored before the create goes out, in one write with the marks of the creates queued
        # behind it (their threads have reserved later slots): a write for several creates.
        sleep_until(slot - MARK_LEAD_SECONDS)
        self.ledger.flush(mark)
        sleep_until(slot)
        if self.abort:
            self.ledger.drop(index)
            return
        try:
            prediction = self.op.hook.create_prediction(self.op.model, model_input, cancel_after=self.timeout)
        except FluxKontextPredictionMayExistError as exc:
            # Left "creating": the retry looks for it in the account's list before creating again.
            with self._lock:
                self.errors[index] = f"the create may have started a prediction: {self._redact(exc)}"
            return
        except FluxKontextAPIError as exc:
            if exc.status == 422:
                why = f"the server rejects the input: {self._redact(exc)}"
                self.ledger.put(index, s="rejected", fp=fingerprint, e=why)
                return
            if refused_create(exc):  # the server answered: nothing was created
                self.ledger.drop(index)
            self._failed(index, exc, "create")
            return
        except (FluxKontextError, OSError) as exc:
            # The request may have reached the server: the "creating" mark stays, so a retry
            # looks for its prediction in the account's list before creating again.
            self._failed(index, exc, "create")
            return
        if not prediction.id:
            self.ledger.put(
                index, s="rejected", fp=fingerprint, e="the server answered without a prediction id"
            )
            return
        # Written with the next "creating" mark or the creator's periodic flush: until then the
        # stored "creating" entry stands for it, and a retry finds the prediction in the list.
        self.ledger.put(index, flush=False, s=CREATED, fp=fingerprint, k=key, id=prediction.id, t=time.time())
        with self._lock:
            self.created += 1

    def _prepared(self, item: BatchItem) -> tuple[Any, dict[str, Any], Any]:
        """Return the request read again (the image's bytes), with the image sent (inline or uploaded)."""
        from airflow_provider_kontext.edits.request import validated_request
        from airflow_provider_kontext.models.images import to_data_uri

        op = self.op
        arguments = {**op._model_arguments(), "prompt": item.prompt}
        request = validated_request(op.model, arguments, item.image, op.extra_input, None, self.seed_from)
        model_input = dict(request.model_input)
        image = request.image
        if image is not None:
            if len(image.data) <= op.inline_image_max_bytes:
                model_input["input_image"] = to_data_uri(image.data, image.content_type)
            else:
                uploaded = op.hook.upload_file(
                    image.data, filename=image.name, content_type=image.content_type
                )
                model_input["input_image"] = uploaded.urls.get
        return request, model_input, image

    def _redact(self, exc: BaseException) -> str:
        """Return the error's text without the connection's secrets (for the store, XCom, manifest)."""
        return str(self.op.hook.redact(str(exc)))

    def _failed(self, index: int, exc: BaseException, what: str) -> None:
        final = isinstance(exc, FluxKontextAuthError | FluxKontextTLSError) or (
            isinstance(exc, FluxKontextNotFoundError) and what == "create"
        )
        with self._lock:
            text = self._redact(exc)
            self.errors[index] = f"{what} failed: {text}"
            if final and self.abort is None:
                self.abort = f"the {what} was refused ({text}); the others would get the same answer"
                self.log.error("Batch: stopping the creates: %s", self.abort)


def adopt_orphans(op: CreatingTask, ledger: BatchLedger, lost: list[int], log: Any) -> list[int]:
    """Record the predictions of creates whose answer was lost; return the images that have none.

    A killed worker or a dropped connection can lose a create's answer: its prediction is looked
    for in the account's list, by model, prompt and input image. The images without one are to be
    created now.

    :raises FluxKontextError: the list could not be read (the task fails and its retry looks again).
    """
    earliest = min(float(ledger.entry(index).get("c", time.time())) for index in lost)  # type: ignore[union-attr]
    window = ledger.window or (datetime.fromtimestamp(earliest, timezone.utc) - ORPHAN_MARGIN).isoformat()
    found = asyncio.run(_listed(op, window))
    claimed = {str(entry["id"]) for _, entry in ledger.entries() if entry and entry.get("id")}
    recreate = []
    for index in lost:
        entry = dict(ledger.entry(index) or {})
        match = next((pid for pid in found.get(str(entry.get("k")), []) if pid not in claimed), None)
        if match is None:
            log.info("Image %d: its lost create made no prediction; creating it", index)
            recreate.append(index)
            continue
        claimed.add(match)
        log.info("Image %d: found prediction %s of its lost create in the account's list", index, match)
        ledger.put(
            index, flush=False, s=CREATED, fp=entry.get("fp"), k=entry.get("k"), id=match, t=entry.get("c")
        )
    ledger.flush()
    return recreate


async def _listed(op: CreatingTask, window: str) -> dict[str, list[str]]:
    """Return the account's predictions of ``op.model`` since ``window``, by identity key, oldest first."""
    model = op.model.split(":", 1)[0]
    found: dict[str, list[tuple[str, str]]] = {}
    hook = op.hook
    try:
        cursor = None
        while True:
            page = await hook.alist_predictions(created_after=window, cursor=cursor)
            for item in page.results:
                if not isinstance(item, dict) or item.get("model") != model or not item.get("id"):
                    continue
                key = listed_identity(item.get("input") or {}, max(op.inline_image_max_bytes, 1) * 2)
                if key is not None:
                    found.setdefault(key, []).append((str(item.get("created_at")), str(item["id"])))
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        await hook.aclose()
    return {key: [pid for _, pid in sorted(pairs)] for key, pairs in found.items()}
