"""Let a retry of an edit find the prediction an earlier try started, instead of paying twice.

What it needs is kept in Airflow's task state store (which survives retries; XComs do not).

One entry per task instance goes through these states:

- *create under way* (``{"creating": {fingerprint, since}}``), written just before the create: a
  retry that finds it (the try died before learning the id) searches the account's predictions
  created since then for the lost one (:mod:`airflow_provider_kontext.edits.orphans`);
- *created* (``{id, fingerprint, deadline}``), written right after the create: a retry reattaches to
  the prediction while it runs, or takes its outputs once it succeeded;
- *finished by try N* (``finished``: the try number and the task instance's series, below), written
  when the edit is done, in place of deleting the entry: Airflow may still fail that try after the
  provider finished (its scheduler race, a killed worker), and the retry then completes from the
  same prediction in seconds, paying nothing;
- *cleared*: a finished entry from an earlier series, which a try ignores (a fresh edit).

Retry or clear: Airflow keeps the store on both (only ``[state_store] clear_on_success`` empties it,
in the same transaction that records the success). What tells them apart is the task instance's
``max_tries``: a retry keeps it, while clearing a task instance sets it to the try number plus
``retries`` (``clear_task_instances``, and the scheduler for a task cleared while running), which
is Airflow's own way of finding a series' first try (``max_tries - retries + 1``). The DAG run's
``clear_number``, which every clear in the run raises, is compared too, so a clear that happens to
leave ``max_tries`` unchanged (``retries`` lowered in between) still edits afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_kontext.exceptions import FluxKontextNotFoundError
from airflow_provider_kontext.models import PredictionStatus

if TYPE_CHECKING:
    from airflow_provider_kontext.models import Prediction

#: Key of the entry in the task state store.
STATE_KEY = "flux_kontext_prediction"


def fingerprint(model: str, model_input: dict[str, Any], image: bytes | None = None) -> str:
    """Return a digest of everything that decides the edit.

    The model and its inputs, a local image by the digest of its bytes (it is sent as a data: URI
    or an upload URL that differs on each try).
    """
    identity = dict(model_input)
    if image is not None:
        identity["input_image"] = "sha256:" + hashlib.sha256(image).hexdigest()
    document = json.dumps({"model": model, "input": identity}, sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()


class Series(NamedTuple):
    """Which series of tries of its task instance a try belongs to (see the module docstring).

    The try number, ``max_tries`` and the DAG run's ``clear_number`` (``None`` where unknown).
    """

    try_number: int | None
    max_tries: int | None
    clear_number: int | None

    @classmethod
    def of(cls, context: Any) -> Series:
        """Return the series of the try that runs in ``context``."""
        ti = context.get("ti")
        dag_run = context.get("dag_run")
        return cls(
            _count(getattr(ti, "try_number", None)),
            _count(getattr(ti, "max_tries", None)),
            _count(getattr(dag_run, "clear_number", None)),
        )

    def first_try(self, retries: int) -> bool:
        """Tell whether this is the first try since the task instance was created or last cleared.

        ``True`` when unknown; reckoned as Airflow itself does.
        """
        if self.try_number is None or self.max_tries is None:
            return True
        return self.try_number <= self.max_tries - retries + 1

    def continues(self, finished: Mapping[str, Any]) -> bool:
        """Tell whether a try of this series finished the edit.

        Same ``max_tries``, same ``clear_number``, an earlier (or the same) try number. An entry
        without them is taken as this series'.
        """
        return (
            finished.get("max_tries") == self.max_tries
            and finished.get("clear_number") == self.clear_number
            and (
                not isinstance(finished.get("try_number"), int)
                or self.try_number is None
                or finished["try_number"] <= self.try_number
            )
        )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Started(NamedTuple):
    """The prediction an earlier try started.

    Its id, the request's fingerprint, the deadline (Unix time on the worker's clock; ``None`` from
    an entry written before deadlines were kept), and who finished it (``None`` while no try has).
    """

    prediction_id: str
    fingerprint: str | None
    deadline: float | None
    finished: dict[str, Any] | None = None


class Creating(NamedTuple):
    """A create an earlier try began and never recorded.

    The request's fingerprint and when (Unix time on the worker's clock, taken before the request
    was sent).
    """

    fingerprint: str
    since: float


class ReattachLedger:
    """Reads and writes this task instance's entry in the task state store.

    Without a store (Airflow < 3.3, or reattaching switched off) it remembers nothing: a retry then
    finds an earlier try's prediction only by searching the list (see the operator).
    """

    def __init__(self, store: Any, series: Series | None = None) -> None:
        self._store = store
        self.series = series or Series(None, None, None)
        # The entry as this try last read or wrote it: read once per task start. Only this try
        # writes it meanwhile (one try of a task instance runs at a time), and every store call is
        # a request to Airflow's API server.
        self._cached: dict[str, Any] | None = None
        self._loaded = False

    @classmethod
    def from_context(cls, context: Any, *, enabled: bool) -> ReattachLedger:
        """Return the ledger of the try in ``context``; a disabled one when not ``enabled``."""
        return cls(context.get("task_state_store") if enabled else None, Series.of(context))

    @property
    def enabled(self) -> bool:
        """Tell whether the ledger has a store to keep its entry in."""
        return self._store is not None

    def _entry(self) -> dict[str, Any] | None:
        if self._store is None:
            return None
        if not self._loaded:
            saved = self._store.get(STATE_KEY)
            self._cached = saved if isinstance(saved, dict) else None
            self._loaded = True
        return self._cached

    def _write(self, entry: dict[str, Any] | None) -> None:
        """Store ``entry`` (``None``: delete it), and remember it as read."""
        if entry is None:
            self._store.delete(STATE_KEY)
        else:
            self._store.set(STATE_KEY, entry)
        self._cached, self._loaded = entry, True

    def started(self) -> Started | None:
        """Return the entry of an earlier try, if there is a readable one with a prediction id."""
        saved = self._entry()
        if saved is None or not isinstance(saved.get("id"), str):
            return None
        deadline = saved.get("deadline")
        finished = saved.get("finished")
        return Started(
            saved["id"],
            saved.get("fingerprint") if isinstance(saved.get("fingerprint"), str) else None,
            float(deadline) if isinstance(deadline, int | float) and not isinstance(deadline, bool) else None,
            finished if isinstance(finished, dict) else None,
        )

    def creating(self) -> Creating | None:
        """Return the create an earlier try began without recording its id, if any."""
        saved = self._entry()
        marker = saved.get("creating") if saved is not None else None
        if not isinstance(marker, dict):
            return None
        since = marker.get("since")
        if not isinstance(marker.get("fingerprint"), str) or not isinstance(since, int | float):
            return None
        return Creating(marker["fingerprint"], float(since))

    def reattach(
        self,
        get_prediction: Callable[[str], Prediction],
        fingerprint: str,
        timeout: float,
        log: Any,
    ) -> tuple[Prediction, float] | None:
        """Return the earlier try's prediction and its deadline, or ``None`` when a new one is needed.

        They are returned if the inputs are the same, no clear came after it finished, and it is
        still running or succeeded with its output.

        :param get_prediction: reads a prediction (the hook's); a 404 means it is gone.
        :param timeout: seconds from now, for an entry written before deadlines were kept.
        """
        started = self.started()
        if started is None:
            return None
        previous = started.prediction_id
        if started.finished is not None and not self.series.continues(started.finished):
            log.info(
                "Prediction %s finished in try %s before this task instance was cleared; "
                "starting a fresh edit",
                previous,
                started.finished.get("try_number"),
            )
            return None
        if started.fingerprint != fingerprint:
            log.warning("Inputs changed since prediction %s was started; starting a new one", previous)
            return None
        try:
            prediction = get_prediction(previous)
        except FluxKontextNotFoundError:
            log.warning("Prediction %s from an earlier try no longer exists; starting a new one", previous)
            return None
        # The first try's deadline holds: a retry does not give the prediction more time.
        deadline = started.deadline if started.deadline is not None else time.time() + timeout
        if started.finished is not None:
            log.info(
                "Try %s finished prediction %s but Airflow did not record its success; completing from it",
                started.finished.get("try_number"),
                previous,
            )
        return (prediction, deadline) if usable(prediction, "from an earlier try", log) else None

    def begin_create(self, fingerprint: str, since: float) -> None:
        """Remember that a create is about to be sent, before the request.

        A retry of a try that dies before :meth:`record` then knows to search for the prediction.
        """
        if self._store is not None:
            self._write({"creating": {"fingerprint": fingerprint, "since": since}})

    def record(self, prediction_id: str, fingerprint: str, deadline: float) -> None:
        """Remember a prediction right after it was created (before anything else can fail)."""
        if self._store is not None:
            self._write({"id": prediction_id, "fingerprint": fingerprint, "deadline": deadline})

    def drop(self) -> None:
        """Delete the entry.

        A create answered with a finished result and no id (a proxy's images API answer) leaves a
        retry nothing to reattach to or search for.
        """
        if self._store is not None:
            self._write(None)

    def finish(self, prediction_id: str | None) -> None:
        """Mark the entry of ``prediction_id`` finished by this try's series, keeping it.

        See the module docstring for series. Until Airflow records the success, a retry completes
        from it; after a clear, a try sees another series and edits afresh. Nothing happens for
        another prediction's entry, or without one.
        """
        started = self.started()
        if started is None or started.prediction_id != prediction_id or self._store is None:
            return
        self._write(dict(self._entry() or {}, finished=self.series._asdict()))


def usable(prediction: Prediction, origin: str, log: Any) -> bool:
    """Tell whether a prediction found for this task can be waited for or completed from.

    That is running, or succeeded with its output. ``origin`` says how it was found, for the log.
    """
    status = prediction.status.value
    if not prediction.is_terminal:
        log.info("Reattaching to prediction %s (%s) %s", prediction.id, status, origin)
        return True
    if prediction.status is PredictionStatus.SUCCEEDED and prediction.output_urls:
        log.info("Prediction %s %s already succeeded; using its output", prediction.id, origin)
        return True
    log.info("Prediction %s %s ended %s; starting a new one", prediction.id, origin, status)
    return False
