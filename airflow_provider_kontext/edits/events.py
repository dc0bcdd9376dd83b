"""The event that ends a wait for a prediction, and the summary a finished edit leaves in XCom.

The trigger (in the triggerer) and the operator's in-worker loop both end in a
:class:`PredictionEvent`; the operator (and the sensor) turn it into the task's result. It travels
as the trigger's payload, so it holds JSON primitives only: no inputs (they may hold a large
``data:`` URI) and nothing secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from airflow_provider_kontext.edits.deadlines import canceled_at_deadline
from airflow_provider_kontext.edits.lineage import public_location
from airflow_provider_kontext.models import Prediction, PredictionStatus

#: Longest error text and log tail carried in an event (events are stored in the metadata DB).
MAX_EVENT_TEXT = 4000
#: Most model log lines an unsuccessful prediction's event carries (after collapsing progress bars):
#: enough to see how far it got, short enough for the one line Airflow logs the event in.
EVENT_LOG_TAIL_LINES = 10
#: Output files are deleted by Replicate about an hour after the prediction completes.
OUTPUT_RETENTION = timedelta(hours=1)

#: The line the model logs first: the seed it used (the one given, or the random one it drew).
SEED_LINE = re.compile(r"^Using seed: (\d+)\s*$", re.MULTILINE)

EventStatus = Literal["succeeded", "failed", "canceled", "aborted", "timeout", "error"]


#: A tqdm progress bar line as Replicate shows it, e.g. " 46%|████▋     | 13/28 [00:01<00:01, 9.33it/s]".
PROGRESS_BAR_LINE = re.compile(r"^\s*\d{1,3}%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^\]]*)\]")


def is_progress_bar(line: str) -> bool:
    """Whether ``line`` is a tqdm progress bar line."""
    return "|" in line and PROGRESS_BAR_LINE.match(line) is not None


def collapse_progress_bars(lines: list[str]) -> list[str]:
    """``lines`` with each run of progress bar lines cut to its last (the others are superseded)."""
    kept: list[str] = []
    for line in lines:
        if kept and is_progress_bar(line) and is_progress_bar(kept[-1]):
            kept[-1] = line
        else:
            kept.append(line)
    return kept


class PredictionEvent(BaseModel):
    """How a wait for a prediction ended.

    ``status`` is the prediction's terminal status, or ``timeout`` (the deadline passed first) or
    ``error`` (polling failed for good; ``message`` says why). Unknown keys are ignored, so an event
    written by an older version of the trigger still reads.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: EventStatus
    prediction_id: str | None = None
    model: str | None = None
    output: list[str] = []
    error: str | None = None
    logs_tail: str = ""
    predict_time: float | None = None
    created_at: str | None = None
    completed_at: str | None = None
    web_url: str | None = None
    data_removed: bool = False
    message: str | None = None
    #: The proxy's rewritten prompt (images-API answers), when it gave one.
    revised_prompt: str | None = None
    #: What the answer looked like, named in the error when it has no usable output.
    shape: str | None = None
    #: Where the prediction's input image is (URL or path without userinfo or query; ``None`` for a
    #: ``data:`` image): lineage of a prediction the task did not start (the sensor's).
    input_location: str | None = None
    #: The seed the model used: from its "Using seed: N" log line when any read saw it, else the
    #: input's seed (``None`` when neither is known: a random seed reported only in logs not read).
    seed: int | None = None
    #: ``canceled`` by the server at the prediction's deadline (the ``Cancel-After`` its create sent).
    at_deadline: bool = False

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any] | PredictionEvent) -> PredictionEvent:
        """Return the event from a trigger's payload (or the event itself)."""
        return payload if isinstance(payload, PredictionEvent) else cls.model_validate(dict(payload))

    def payload(self) -> dict[str, Any]:
        """Return the event as the JSON-primitive dict a ``TriggerEvent`` carries."""
        return self.model_dump(mode="json")

    def summary(self, outputs: list[str], **context: Any) -> dict[str, Any]:
        """Return the ``prediction`` XCom of a finished edit.

        Ids, times, where the outputs are and when the server deletes its copies; ``context`` adds
        what the caller knows (input image, prompt).
        """
        expires = None
        if self.completed_at:
            try:
                expires = (datetime.fromisoformat(self.completed_at) + OUTPUT_RETENTION).isoformat()
            except ValueError:
                expires = None
        summary: dict[str, Any] = {
            "id": self.prediction_id,
            "status": self.status,
            "model": self.model,
            "predict_time": self.predict_time,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "web_url": self.web_url,
            "output_urls": [url if not url.startswith("data:") else "data:..." for url in self.output],
            "urls_expire_at": expires,
            "outputs": outputs,
            "seed": self.seed,
        }
        if self.revised_prompt:
            summary["revised_prompt"] = self.revised_prompt
        summary.update(context)
        return summary


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else repr(value)
    return text[:MAX_EVENT_TEXT]


def seed_of(prediction: Prediction, seen: int | None = None) -> int | None:
    """Return the seed the model used for ``prediction``.

    Its "Using seed: N" log line, else the one an earlier read's logs showed (``seen``), else the
    seed of its input (0 means random to the model, so it tells nothing). The list endpoint's
    answers carry the input but no logs.
    """
    match = SEED_LINE.search(prediction.logs or "")
    if match:
        return int(match.group(1))
    return seen if seen is not None else given_seed((prediction.input or {}).get("seed"))


def given_seed(value: Any) -> int | None:
    """Return a seed as given to the model (an int, or its text after templating).

    ``None`` for none, for anything else, and for 0 (random to the model).
    """
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
        return None
    return int(str(value)) or None


def prediction_event(
    prediction: Prediction, redact: Callable[[str], str] | None = None, *, seed: int | None = None
) -> PredictionEvent:
    """Return the event for a prediction in a terminal status.

    The model's error and log tail, which a proxy may echo a token into, pass through ``redact``
    (the hook's): events are logged and stored.

    Only an unsuccessful prediction's event carries a log tail (its last lines, each run of progress
    bar lines cut to its last): it says how far the model got. A success's logs were already
    reported while it ran, and Airflow logs the whole event when the trigger fires.
    """
    error = _text(prediction.error)
    tail = ""
    if prediction.status is not PredictionStatus.SUCCEEDED and prediction.logs:
        lines = collapse_progress_bars(prediction.logs.rstrip("\n").splitlines())
        tail = "\n".join(lines[-EVENT_LOG_TAIL_LINES:])[-MAX_EVENT_TEXT:]
    if redact is not None:
        error = None if error is None else redact(error)
        tail = redact(tail)
    return PredictionEvent(
        status=prediction.status.value,  # type: ignore[arg-type]  # terminal statuses only
        prediction_id=prediction.id,
        model=prediction.model,
        output=prediction.output_urls,
        error=error,
        logs_tail=tail,
        predict_time=prediction.metrics.predict_time,
        created_at=prediction.created_at.isoformat() if prediction.created_at else None,
        completed_at=prediction.completed_at.isoformat() if prediction.completed_at else None,
        web_url=prediction.web_url,
        data_removed=prediction.data_removed,
        revised_prompt=prediction.revised_prompt,
        shape=prediction.shape,
        input_location=public_location((prediction.input or {}).get("input_image")),
        seed=seed_of(prediction, seed),
        at_deadline=canceled_at_deadline(prediction),
    )


def timeout_event(prediction_id: str | None, waited: float, last_status: str | None) -> PredictionEvent:
    """Return the event when the deadline passed before the prediction finished."""
    return PredictionEvent(
        status="timeout",
        prediction_id=prediction_id,
        message=f"Prediction {prediction_id} did not finish within the deadline "
        f"(waited {waited:.0f}s, last status {last_status or 'unknown'})",
    )


def error_event(prediction_id: str | None, message: str) -> PredictionEvent:
    """Return the event when polling itself failed for good (bad token, unknown prediction, ...)."""
    return PredictionEvent(status="error", prediction_id=prediction_id, message=message[:MAX_EVENT_TEXT])
