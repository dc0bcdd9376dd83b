"""Create a batch's predictions: paced, each recorded before and after; find creates whose answer was lost.

The batch operator (:mod:`airflow_provider_kontext.operators.batch`) tells the story; these steps do
the creating with the single edit's pieces (request checks, image sending) and record each image's
state in the :class:`~airflow_provider_kontext.edits.batch_ledger.BatchLedger`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

from airflow_provider_kontext.edits.batch_ledger import CREATED, CREATING, PROGRESS_SECONDS, BatchLedger
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
from airflow_provider_kontext.models.images import decode_data_uri

if TYPE_CHECKING:
    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.edits.request import EditRequest
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.models import PredictionPage

#: Created predictions not yet written with a "creating" mark are written at least this often.
FLUSH_SECONDS = 1.0
#: How long before its paced turn a create's "creating" mark is written (with those queued behind).
MARK_LEAD_SECONDS = 0.1
#: A batch's orphan search looks this far after the latest lost create's mark (the worker's clock
#: behind the server's, the create's own time with its retries).
ORPHAN_SPAN = timedelta(minutes=5)


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
        self,
        op: CreatingTask,
        ledger: BatchLedger,
        *,
        timeout: float,
        log: Any,
        seed_from: str | None = None,
        try_number: int = 0,
    ):
        self.op = op
        #: This try's number, recorded with each prediction it creates.
        self.try_number = try_number
        self.seed_from = seed_from
        self.ledger = ledger
        self.timeout = timeout
        self.log = log
        #: Why creating stopped for every image (the same answer awaits each), if it did.
        self.abort: str | None = None
        #: Why an image's create failed, by index.
        self.errors: dict[int, str] = {}
        self.created = 0
        #: Set when the task is killed: no create starts, and one that returns is canceled.
        self.killed = False
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
        if self.abort or self.killed:
            return
        try:
            request, model_input = self._prepared(item)
        except FluxKontextInputError as exc:
            self.ledger.put(index, s="rejected", fp=item.fingerprint[:16], e=self._redact(exc))
            return
        except (FluxKontextError, OSError) as exc:
            self._failed(index, exc, "upload")
            return
        fingerprint = request.fingerprint[:16]
        slot = pacer.reserve()
        mark = self.ledger.put(index, flush=False, s=CREATING, fp=fingerprint, c=time.time())
        # Stored before the create goes out, in one write with the marks of the creates queued
        # behind it (their threads have reserved later slots): a write for several creates.
        sleep_until(slot - MARK_LEAD_SECONDS)
        self.ledger.flush(mark)
        sleep_until(slot)
        if self.abort or self.killed:
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
        self.ledger.put(
            index, flush=False, s=CREATED, fp=fingerprint, id=prediction.id, t=time.time(), r=self.try_number
        )
        with self._lock:
            self.created += 1
        if self.killed:  # created while the kill canceled the others: canceled too
            from airflow_provider_kontext.operators.batch_kill import cancel_one, mark_killed

            mark_killed(self.ledger, [(index, prediction.id)], self.log)
            cancel_one(self.op.hook, self.ledger, index, prediction.id, self.log)

    def _prepared(self, item: BatchItem) -> tuple[EditRequest, dict[str, Any]]:
        """Return the request read again (the image's bytes), with the image sent (inline or uploaded)."""
        from airflow_provider_kontext.models.images import to_data_uri

        op = self.op
        request = item_request(op, item, self.seed_from)
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
        return request, model_input

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


def item_request(op: CreatingTask, item: BatchItem, seed_from: str | None) -> EditRequest:
    """Return an image's request as its create sends it: validated, its image read, its seed drawn.

    :raises FluxKontextInputError: the image or an input is not usable.
    """
    from airflow_provider_kontext.edits.request import validated_request

    arguments = {**op._model_arguments(), "prompt": item.prompt}
    return validated_request(op.model, arguments, item.image, op.extra_input, None, seed_from)


def adopt_orphans(
    op: CreatingTask,
    ledger: BatchLedger,
    items: list[BatchItem],
    lost: list[int],
    log: Any,
    seed_from: str | None = None,
) -> list[int]:
    """Record the predictions of creates whose answer was lost; return the images that have none.

    A killed worker or a dropped connection can lose a create's answer. Each lost create is looked
    for as the single edit's retry looks for its own
    (:func:`~airflow_provider_kontext.edits.orphans.search_with_hook`: the one prediction of the
    same model, version and input created since its "create under way" mark; none or several mean a
    new create), among the predictions no other image of the batch has recorded. The window is read
    once for all lost creates. The images without one are to be created now. ``seed_from`` is the
    creates' (the seed each drew is part of the input looked for).

    :raises FluxKontextError: the list could not be read (the task fails and its retry looks again).
    """
    from airflow_provider_kontext.edits.orphans import MAX_PAGES, search_with_hook, wanted_for

    marks = [float((ledger.entry(index) or {}).get("c", time.time())) for index in lost]
    since = datetime.fromtimestamp(min(marks), timezone.utc)
    until = datetime.fromtimestamp(max(marks), timezone.utc) + ORPHAN_SPAN
    claimed = {str(entry["id"]) for _, entry in ledger.entries() if entry and entry.get("id")}
    pages = ListedPages(op.hook, claimed, max(op.inline_image_max_bytes, 1) * 2)
    # The batch's own creates may fill the window: the search may read as many pages as they take.
    max_pages = MAX_PAGES + (ledger.size + 99) // 100
    recreate = []
    for index in lost:
        entry = dict(ledger.entry(index) or {})
        request = item_request(op, items[index], seed_from)
        wanted = wanted_for(op.model, request.model_input, request.image, op.inline_image_max_bytes)
        wanted = wanted._replace(input=compact_input(wanted.input, pages.max_bytes))
        log.info("Image %d: looking for the prediction of its lost create", index)
        found = search_with_hook(
            op.hook, wanted, since, log, until=until, max_pages=max_pages, list_page=pages
        )
        if found is None or not found.id:
            recreate.append(index)
            continue
        claimed.add(found.id)
        ledger.put(index, flush=False, s=CREATED, fp=entry.get("fp"), id=found.id, t=entry.get("c"))
    ledger.flush()
    return recreate


class ListedPages:
    """The account's list read once for several searches, inline images as digests, claimed ones left out.

    A :data:`~airflow_provider_kontext.edits.orphans.ListPage`: each page is fetched once (the
    searches of a batch's lost creates share their window); an inline image (``data:`` URI) is kept
    as ``sha256:<digest>`` of its bytes (:func:`compact_input`), so thousands of listed predictions
    hold no image; predictions recorded for other images are not shown to the search.
    """

    def __init__(self, hook: FluxKontextHook, claimed: set[str], max_bytes: int) -> None:
        self.hook = hook
        self.claimed = claimed
        self.max_bytes = max_bytes
        self._pages: dict[tuple[str | None, str | None, str | None], PredictionPage] = {}

    def __call__(self, after: str | None, before: str | None, cursor: str | None) -> PredictionPage:
        """Return the page of the window from ``after`` to ``before`` at ``cursor`` (read once)."""
        key = (after, before, cursor)
        if key not in self._pages:
            page = self.hook.list_predictions(created_after=after, created_before=before, cursor=cursor)
            results = [
                {**item, "input": compact_input(item["input"], self.max_bytes)}
                if isinstance(item, dict) and isinstance(item.get("input"), dict)
                else item
                for item in page.results
            ]
            self._pages[key] = page.model_copy(update={"results": results})
        page = self._pages[key]
        shown = [
            item for item in page.results if not (isinstance(item, dict) and item.get("id") in self.claimed)
        ]
        return page.model_copy(update={"results": shown})


def compact_input(model_input: Mapping[str, Any], max_bytes: int) -> dict[str, Any]:
    """Return the input with an inline image (``data:`` URI) as ``sha256:<digest>`` of its bytes.

    A URI that cannot be read (cut short by the server, too large) becomes ``data:unreadable``,
    which matches no image.
    """
    compact = dict(model_input)
    sent = compact.get("input_image")
    if isinstance(sent, str) and sent.startswith("data:"):
        try:
            compact["input_image"] = "sha256:" + hashlib.sha256(decode_data_uri(sent, max_bytes)).hexdigest()
        except ValueError:
            compact["input_image"] = "data:unreadable"
    return compact
