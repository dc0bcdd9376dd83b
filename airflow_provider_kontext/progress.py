"""What the deferrable trigger and the operator's in-worker polling share: how a prediction's
progress is reported and how a finished (or timed-out) prediction is described in an event.

Both paths produce the same event dict, so ``FluxKontextEditOperator.execute_complete`` handles
them identically.
"""

from __future__ import annotations

import time
from typing import Any

from airflow_provider_kontext.models import Prediction

#: Longest single log line passed on to the task log.
MAX_LOG_LINE = 500
#: Most new log lines reported per poll (a model that floods its logs cannot flood the task log).
MAX_LOG_LINES_PER_POLL = 40
#: Longest error text and log tail carried in an event (events are stored in the metadata DB).
MAX_EVENT_TEXT = 4000


class ProgressTracker:
    """Remembers what was already reported of one prediction, so each poll reports only what is new:
    a status change and log lines that appeared since the last poll."""

    def __init__(self, prediction_id: str | None) -> None:
        self.prediction_id = prediction_id
        self.status: str | None = None
        self._logs_seen = 0

    def update(self, prediction: Prediction) -> list[str]:
        """The lines to log for this poll (status change first, then new complete log lines)."""
        messages: list[str] = []
        status = prediction.status.value
        if status != self.status:
            messages.append(f"Prediction {self.prediction_id} is {status}")
            self.status = status
        logs = prediction.logs or ""
        if len(logs) < self._logs_seen:  # the logs were replaced (e.g. deleted after retention)
            self._logs_seen = 0
        fresh = logs[self._logs_seen :]
        if not prediction.is_terminal:
            # Report only complete lines while running; the last one may still be growing.
            cut = fresh.rfind("\n") + 1
            fresh = fresh[:cut]
        self._logs_seen += len(fresh)
        lines = [line.rstrip() for line in fresh.replace("\r", "\n").split("\n") if line.strip()]
        if len(lines) > MAX_LOG_LINES_PER_POLL:
            messages.append(f"({len(lines) - MAX_LOG_LINES_PER_POLL} model log lines skipped)")
            lines = lines[-MAX_LOG_LINES_PER_POLL:]
        messages.extend(f"model: {line[:MAX_LOG_LINE]}" for line in lines)
        return messages


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else repr(value)
    return text[:MAX_EVENT_TEXT]


def prediction_event(prediction: Prediction) -> dict[str, Any]:
    """The event for a prediction in a terminal status: JSON primitives only, no inputs (they may
    hold a large data: URI), nothing secret."""
    return {
        "status": prediction.status.value,
        "prediction_id": prediction.id,
        "model": prediction.model,
        "output": prediction.output_urls,
        "error": _text(prediction.error),
        "logs_tail": prediction.logs_tail()[-MAX_EVENT_TEXT:],
        "predict_time": prediction.metrics.predict_time,
        "created_at": prediction.created_at.isoformat() if prediction.created_at else None,
        "completed_at": prediction.completed_at.isoformat() if prediction.completed_at else None,
        "web_url": prediction.web_url,
        "data_removed": prediction.data_removed,
    }


def timeout_event(prediction_id: str | None, waited: float, last_status: str | None) -> dict[str, Any]:
    """The event when the deadline passed before the prediction finished."""
    return {
        "status": "timeout",
        "prediction_id": prediction_id,
        "message": f"Prediction {prediction_id} did not finish within the deadline "
        f"(waited {waited:.0f}s, last status {last_status or 'unknown'})",
    }


def error_event(prediction_id: str | None, message: str) -> dict[str, Any]:
    """The event when polling itself failed for good (bad token, unknown prediction, ...)."""
    return {"status": "error", "prediction_id": prediction_id, "message": message[:MAX_EVENT_TEXT]}


class PredictionPoller:
    """The decisions of a polling loop, without its I/O: the trigger (async) and the operator's
    in-worker loop (sync) feed it each poll's result and do what it says.

    :param prediction_id: the prediction being watched.
    :param poll_interval: seconds between polls.
    :param end_time: Unix time after which the wait ends with a ``timeout`` event (``None``: never).
    :param max_consecutive_errors: polls in a row that may fail (each after the hook's own retries)
        before the wait ends with an ``error`` event; the deadline ends it earlier.
    :param log: where progress lines go (``logger.info``).
    """

    def __init__(
        self,
        prediction_id: str,
        *,
        poll_interval: float,
        end_time: float | None,
        max_consecutive_errors: int = 10,
        log: Any = None,
    ) -> None:
        self.prediction_id = prediction_id
        self.poll_interval = poll_interval
        self.end_time = end_time
        self.max_consecutive_errors = max_consecutive_errors
        self.tracker = ProgressTracker(prediction_id)
        self._log = log
        self._errors = 0
        self._started = time.time()

    def _deadline_passed(self) -> bool:
        return self.end_time is not None and time.time() >= self.end_time

    def _timeout(self) -> dict[str, Any]:
        return timeout_event(self.prediction_id, time.time() - self._started, self.tracker.status)

    def on_prediction(self, prediction: Prediction) -> dict[str, Any] | None:
        """Report progress; return the final event if the wait is over, else ``None``."""
        self._errors = 0
        lines = self.tracker.update(prediction)  # also tracks the status the timeout message names
        if self._log is not None:
            for line in lines:
                self._log(line)
        if prediction.is_terminal:
            return prediction_event(prediction)
        if self._deadline_passed():
            return self._timeout()
        return None

    def on_error(self, exc: Exception) -> dict[str, Any] | None:
        """Judge a failed poll: the final event if the wait is over, else ``None`` (poll again).

        Auth, not-found and other client errors end the wait at once; transient ones (network,
        429, 5xx, a malformed answer) are tolerated ``max_consecutive_errors`` times in a row.
        """
        from airflow_provider_kontext.exceptions import (
            KontextAPIError,
            KontextRateLimitError,
            KontextServerError,
            KontextTransportError,
        )

        transient = isinstance(exc, KontextRateLimitError | KontextServerError | KontextTransportError) or (
            isinstance(exc, KontextAPIError) and (exc.status is None or 200 <= exc.status < 300)
        )
        self._errors += 1
        if not transient or self._errors > self.max_consecutive_errors:
            why = "" if not transient else f" ({self._errors} polls in a row failed)"
            return error_event(
                self.prediction_id, f"Polling prediction {self.prediction_id} failed{why}: {exc}"
            )
        if self._log is not None:
            self._log(f"Polling prediction {self.prediction_id} failed, will poll again: {exc}")
        if self._deadline_passed():
            return self._timeout()
        return None

    def delay(self) -> float:
        """Seconds until the next poll (never past the deadline by more than a moment)."""
        delay = self.poll_interval
        if self.end_time is not None:
            delay = max(0.0, min(delay, self.end_time - time.time()))
        return delay
