"""What a retry of an edit needs to find the prediction an earlier try started, instead of paying
for a second one: the prediction id, a fingerprint of the request, and the deadline, kept in
Airflow's task state store (which survives retries; XComs do not).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_kontext.exceptions import KontextNotFoundError
from airflow_provider_kontext.models import PredictionStatus

if TYPE_CHECKING:
    from airflow_provider_kontext.models import Prediction

#: Key of the entry in the task state store.
STATE_KEY = "flux_kontext_prediction"


def fingerprint(model: str, model_input: dict[str, Any], image: bytes | None = None) -> str:
    """A digest of everything that decides the edit: the model and its inputs, a local image by the
    digest of its bytes (it is sent as a data: URI or an upload URL that differs on each try)."""
    identity = dict(model_input)
    if image is not None:
        identity["input_image"] = "sha256:" + hashlib.sha256(image).hexdigest()
    document = json.dumps({"model": model, "input": identity}, sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()


class Started(NamedTuple):
    """The prediction an earlier try started: its id, the request's fingerprint, and the deadline
    (Unix time on the worker's clock; ``None`` from an entry written before deadlines were kept)."""

    prediction_id: str
    fingerprint: str | None
    deadline: float | None


class ReattachLedger:
    """Reads and writes this task instance's entry in the task state store.

    Without a store (Airflow < 3.3, or reattaching switched off) it remembers nothing: every try
    starts its own prediction.
    """

    def __init__(self, store: Any) -> None:
        self._store = store

    @classmethod
    def from_context(cls, context: Any, *, enabled: bool) -> ReattachLedger:
        return cls(context.get("task_state_store") if enabled else None)

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def started(self) -> Started | None:
        """The entry of an earlier try, if there is a readable one."""
        if self._store is None:
            return None
        saved = self._store.get(STATE_KEY)
        if not isinstance(saved, dict) or not isinstance(saved.get("id"), str):
            return None
        deadline = saved.get("deadline")
        return Started(
            saved["id"],
            saved.get("fingerprint") if isinstance(saved.get("fingerprint"), str) else None,
            float(deadline) if isinstance(deadline, int | float) and not isinstance(deadline, bool) else None,
        )

    def reattach(
        self,
        get_prediction: Callable[[str], Prediction],
        fingerprint: str,
        timeout: float,
        log: Any,
    ) -> tuple[Prediction, float] | None:
        """The earlier try's prediction and its deadline, if the inputs are the same and it is still
        running or succeeded with its output; else ``None`` (a new prediction is needed).

        :param get_prediction: reads a prediction (the hook's); a 404 means it is gone.
        :param timeout: seconds from now, for an entry written before deadlines were kept.
        """
        started = self.started()
        if started is None:
            return None
        previous = started.prediction_id
        if started.fingerprint != fingerprint:
            log.warning("Inputs changed since prediction %s was started; starting a new one", previous)
            return None
        try:
            prediction = get_prediction(previous)
        except KontextNotFoundError:
            log.warning("Prediction %s from an earlier try no longer exists; starting a new one", previous)
            return None
        # The first try's deadline holds: a retry does not give the prediction more time.
        deadline = started.deadline if started.deadline is not None else time.time() + timeout
        status = prediction.status.value
        if not prediction.is_terminal:
            log.info("Reattaching to prediction %s (%s) started by an earlier try", previous, status)
            return prediction, deadline
        if prediction.status is PredictionStatus.SUCCEEDED and prediction.output_urls:
            log.info("Prediction %s from an earlier try already succeeded; using its output", previous)
            return prediction, deadline
        log.info("Prediction %s from an earlier try ended %s; starting a new one", previous, status)
        return None

    def record(self, prediction_id: str, fingerprint: str, deadline: float) -> None:
        """Remember a prediction right after it was created (before anything else can fail)."""
        if self._store is not None:
            self._store.set(
                STATE_KEY, {"id": prediction_id, "fingerprint": fingerprint, "deadline": deadline}
            )

    def forget(self) -> None:
        """Drop the entry once the edit is done, so a later clear of the task edits afresh."""
        if self._store is not None:
            self._store.delete(STATE_KEY)
