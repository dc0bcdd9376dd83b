"""Find the prediction an earlier try created but did not live to record, instead of paying again.

A try can die (a worker killed, a scheduler race) between Replicate creating its prediction and the
task state store receiving its id. The prediction still exists: Replicate's list
(``GET /v1/predictions``, newest first, 100 a page) answers every prediction of the account with its
``model``, ``version``, ``input`` and ``created_at``. A retry that has no id searches the window in
which the earlier try may have created it for a prediction of the same model with the same input,
and adopts it when exactly one matches; none, or several (another task asking the very same thing in
the same window), means a new create, and the reason is logged.

The image is matched as the list shows it: an http(s) URL or a ``data:`` URI exactly as sent (an
inline image is sent as the same data: URI on every try); an uploaded image by the content of the
file its URL names (each try uploads anew, so the URL differs): ``GET /v1/files/{id}`` answers the
file's sha256, compared with the local image's. A listed data: URI cut short by the server matches
nothing (it cannot be told from another image with the same start).

The cost is bounded: at most :data:`MAX_PAGES` list requests (and one file request per candidate
that matches in everything but an uploaded image). A window holding more predictions than that is
not searched to its end: the retry then creates, and says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_kontext.hooks.api import file_id_of
from airflow_provider_kontext.models import Prediction, PredictionPage
from airflow_provider_kontext.models.images import LocalImage, to_data_uri

if TYPE_CHECKING:
    from airflow_provider_kontext.edits.reattach import ReattachLedger

#: List pages read at most per search (100 predictions a page).
MAX_PAGES = 5
#: Widens the window's start for the difference between the worker's clock and Replicate's.
CLOCK_MARGIN = timedelta(seconds=60)

#: Reads one page: ``(created_after, created_before, cursor)`` (ISO 8601 or ``None``).
ListPage = Callable[[str | None, str | None, str | None], PredictionPage]
#: The sha256 of an uploaded file named by its URL, or ``None`` when it cannot be had.
FileDigest = Callable[[str], str | None]


class Wanted(NamedTuple):
    """What the lost create asked for.

    The model (``owner/name`` or ``owner/name:version``), the input with ``input_image`` as it was
    sent (``None`` for an upload, whose URL differs per try), and for an upload the sha256 of the
    image's bytes.
    """

    model: str
    input: Mapping[str, Any]
    upload_sha256: str | None = None


#: Statuses of a listed prediction that no retry can adopt (it ended without a usable output).
ENDED_UNUSABLE = frozenset({"failed", "canceled", "aborted"})


class Found(NamedTuple):
    """The outcome of a search: the one matching prediction (or ``None``) and why, for the log."""

    prediction: Prediction | None
    reason: str


def find_orphan(
    list_page: ListPage,
    wanted: Wanted,
    *,
    since: datetime,
    until: datetime | None = None,
    file_sha256: FileDigest | None = None,
    max_pages: int = MAX_PAGES,
) -> Found:
    """Search the predictions created from ``since`` until ``until`` for the one ``wanted`` describes.

    ``since`` is taken less :data:`CLOCK_MARGIN`.

    :raises FluxKontextError: the list could not be read (as the hook's failure policy decided).
    """
    after = (since - CLOCK_MARGIN).isoformat()
    before = until.isoformat() if until else None
    matches: list[dict[str, Any]] = []
    near = 0  # same model and inputs but another image: told in the log
    ended = 0  # matches that failed, were canceled or aborted: nothing to adopt, so not counted
    cursor: str | None = None
    seen = 0
    for _ in range(max_pages):
        page = list_page(after, before, cursor)
        for item in page.results:
            seen += 1
            verdict = _compare(item, wanted, file_sha256)
            if verdict is True and item.get("status") in ENDED_UNUSABLE:
                ended += 1  # e.g. this task's earlier edit that failed: it must not make ours ambiguous
            elif verdict is True:
                matches.append(item)
            near += verdict is None
        cursor = page.next_cursor
        if cursor is None:
            break
    else:
        return Found(
            None,
            f"the window from {after} holds more than {seen} predictions (read {max_pages} pages); "
            "not searched to its end",
        )
    window = f"{seen} prediction{'s' if seen != 1 else ''} created since {after}"
    if len(matches) > 1:
        ids = ", ".join(str(item.get("id")) for item in matches[:5])
        return Found(None, f"{len(matches)} of the {window} match ({ids}): cannot tell which is ours")
    if not matches:
        other = f"; {near} differ only in the image" if near else ""
        other += f"; {ended} with it ended failed, canceled or aborted" if ended else ""
        return Found(None, f"none of the {window} has this model and input{other}")
    try:
        prediction = PredictionPage.prediction(matches[0])
    except ValueError:
        return Found(None, f"the one match among the {window} is not a readable prediction")
    return Found(prediction, f"the only one of the {window} with this model and input")


def _compare(item: Mapping[str, Any], wanted: Wanted, file_sha256: FileDigest | None) -> bool | None:
    """Tell whether ``item`` is what ``wanted`` asked for (``True``), all but the image (``None``), or not."""
    given = item.get("input")
    if not isinstance(given, Mapping) or not _same_model(item, wanted.model):
        return False
    theirs = {key: value for key, value in given.items() if key != "input_image"}
    ours = {key: value for key, value in wanted.input.items() if key != "input_image"}
    if theirs != ours:
        return False
    image = given.get("input_image")
    if wanted.upload_sha256 is None:
        return True if image == wanted.input.get("input_image") else None
    if not isinstance(image, str) or not image.startswith(("http://", "https://")) or file_sha256 is None:
        return None
    return True if file_sha256(image) == wanted.upload_sha256 else None


def _same_model(item: Mapping[str, Any], model: str) -> bool:
    """Whether the listed prediction ran ``model`` (and its version, when ``model`` names one)."""
    name, _, version = model.partition(":")
    if item.get("model") != name:
        return False
    return not version or item.get("version") in (version, "hidden", None)


def search_with_hook(
    hook: Any,
    wanted: Wanted,
    since: datetime,
    log: Any,
    *,
    until: datetime | None = None,
    max_pages: int = MAX_PAGES,
    list_page: ListPage | None = None,
) -> Prediction | None:
    """Run :func:`find_orphan` through a hook, logging what it found or why it adopts nothing.

    The hook is a :class:`~airflow_provider_kontext.hooks.kontext.FluxKontextHook`. A server without
    a list (404, 405, 501) means nothing can be found; any other failure to read the list is raised,
    so the task fails and a retry searches again rather than paying twice. ``until`` and
    ``max_pages`` are :func:`find_orphan`'s; ``list_page`` reads the pages instead of the hook's
    list (a batch searching for several lost creates reads the list once).

    :raises FluxKontextError: the list could not be read.
    """
    from airflow_provider_kontext.exceptions import FluxKontextAPIError, FluxKontextNotFoundError

    def hook_page(after: str | None, before: str | None, cursor: str | None) -> PredictionPage:
        page: PredictionPage = hook.list_predictions(
            created_after=after, created_before=before, cursor=cursor
        )
        return page

    def file_sha256(url: str) -> str | None:
        file_id = file_id_of(url, hook.settings.base_url)
        if file_id is None:
            return None
        try:
            return hook.get_file(file_id).checksums.get("sha256")  # type: ignore[no-any-return]
        except FluxKontextNotFoundError as exc:  # gone (expired): it cannot be ours to compare
            log.info("File %s is gone; not comparing it with the input image: %s", file_id, exc)
            return None
        # Any other failure is raised like a failed list read: the retry searches again rather
        # than take an unread file for another image and pay twice.

    try:
        found = find_orphan(
            list_page or hook_page,
            wanted,
            since=since,
            until=until,
            file_sha256=file_sha256,
            max_pages=max_pages,
        )
    except FluxKontextAPIError as exc:
        if exc.status in (404, 405, 501):
            log.warning("No prediction of an earlier try adopted: the server has no list (%s)", exc)
            return None
        if exc.status == 403:
            # A token that may create but not list: no retry could ever search, so failing every
            # retry would only stop the edit; create, and say what a new create may cost.
            log.warning(
                "No prediction of an earlier try adopted: this token may not list predictions (%s); "
                "creating one, which may pay again for an edit an earlier try started",
                exc,
            )
            return None
        log.warning("Could not search for the prediction an earlier try may have created: %s", exc)
        raise
    if found.prediction is None:
        log.info("No prediction of an earlier try adopted: %s; creating one", found.reason)
    else:
        log.info(
            "Adopting prediction %s, created by an earlier try that did not live to record it: %s",
            found.prediction.id,
            found.reason,
        )
    return found.prediction


def search_since(
    ledger: ReattachLedger, context: Any, fingerprint: str, retries: int, log: Any
) -> datetime | None:
    """Return where the search for an earlier try's lost prediction starts, ``None`` if there is none.

    With a task state store: when the entry says a create with the same inputs was under way, from
    the time it was sent. Without one (Airflow < 3.3): on a retry within the first series of tries
    of a DAG run never cleared, from the run's start (a cleared run may hold an earlier edit of the
    same input that the clear asked to redo, which the list cannot tell from this series').
    """
    if ledger.enabled:
        creating = ledger.creating()
        if creating is None:
            return None
        if creating.fingerprint != fingerprint:
            log.warning("Inputs changed since an earlier try began its create; not searching for it")
            return None
        return datetime.fromtimestamp(creating.since, timezone.utc)
    series = ledger.series
    start = getattr(context.get("dag_run"), "start_date", None)
    if series.first_try(retries) or not isinstance(start, datetime):
        return None
    if series.clear_number != 0:
        log.info(
            "Not searching for an earlier try's prediction: this DAG run was cleared, so an earlier "
            "edit of the same input cannot be told from this series'"
        )
        return None
    return start


def wanted_for(
    model: str, model_input: Mapping[str, Any], image: LocalImage | None, inline_max_bytes: int
) -> Wanted:
    """Return what a create of this edit sends, as the list will show it.

    A local image inline as the same data: URI on every try; an uploaded one by the sha256 of its
    bytes (its URL changes per try).
    """
    wanted = dict(model_input)
    if image is None:
        return Wanted(model, wanted)
    if len(image.data) <= inline_max_bytes:
        wanted["input_image"] = to_data_uri(image.data, image.content_type)
        return Wanted(model, wanted)
    wanted.pop("input_image", None)
    return Wanted(model, wanted, hashlib.sha256(image.data).hexdigest())
