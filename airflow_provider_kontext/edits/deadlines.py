"""When a wait for a prediction gives up, on our own clock.

A server's timestamps are never trusted to decide that time is up: a skewed server, a proxy that
reports stale or zone-less times, or a worker with a wrong clock would otherwise end every wait at
once (and cancel predictions already paid for). The timeout counts from when the create returned,
on the worker's clock; the server's ``deadline`` (sent back when ``Cancel-After`` is given) is read
as a duration from its own ``created_at``, so it can bring the deadline closer but never make it
already past.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from airflow_provider_kontext.models import Prediction, PredictionStatus

#: A server ``created_at`` further than this from the local clock is reported as clock skew.
CLOCK_SKEW_SECONDS = 60.0
#: Replicate stops any prediction after 30 minutes; the default deadline when none is given.
DEFAULT_TIMEOUT = timedelta(minutes=30)
#: A cancel this close to a prediction's ``deadline`` (or after it) is taken for the deadline's.
DEADLINE_SLACK = timedelta(seconds=1)

_skew_reported: set[str] = set()


def wait_timeout(timeout: timedelta | float | None, execution_timeout: timedelta | None) -> float:
    """Return the seconds an edit may take.

    ``timeout`` as given; else most of the task's ``execution_timeout`` (all but a tenth, at most a
    minute, and at least half), so the task fails with the prediction's own timeout (and cancels
    it) before Airflow kills it; else :data:`DEFAULT_TIMEOUT`.
    """
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    if timeout is not None:
        return float(timeout)
    if execution_timeout is not None:
        total = execution_timeout.total_seconds()
        return max(total * 0.5, total - min(60.0, total * 0.1))
    return DEFAULT_TIMEOUT.total_seconds()


def create_deadline(started: float, timeout: float, execution_timeout: timedelta | None) -> float:
    """Return the Unix time until which a throttled create is sent again.

    That is the edit's ``timeout`` (see :func:`wait_timeout`) counted from ``started`` (the try's
    start), and never past most of the task's ``execution_timeout``, so the task fails with the
    throttling, not killed by Airflow.
    """
    deadline = started + timeout
    if execution_timeout is not None:
        deadline = min(deadline, started + wait_timeout(None, execution_timeout))
    return deadline


def deadline_after_create(
    prediction: Prediction,
    timeout: float,
    *,
    sent: float,
    returned: float,
    warn: Callable[..., None],
) -> float:
    """Return the Unix time (local clock) at which to stop waiting for a just-created prediction.

    :param timeout: seconds the prediction may take.
    :param sent: local time the create request was sent. :param returned: local time it returned.
    :param warn: where a clock-skew warning goes (once per process and server).
    """
    deadline = returned + timeout
    created = prediction.created_at.timestamp() if prediction.created_at else None
    if created is not None:
        skew = max(sent - created, created - returned, 0.0)
        if skew > CLOCK_SKEW_SECONDS:
            _report_skew(prediction, created - returned, warn)
    if prediction.deadline is not None:
        server_deadline = prediction.deadline.timestamp()
        # The time the server grants, measured on its own clock, then counted on ours.
        granted = server_deadline - created if created is not None else server_deadline - returned
        if granted > 0:
            deadline = min(deadline, returned + granted)
    return deadline


def _report_skew(prediction: Prediction, offset: float, warn: Callable[..., None]) -> None:
    origin = (prediction.urls.get or prediction.web_url or "").split("/v1/", 1)[0]
    if origin in _skew_reported:
        return
    _skew_reported.add(origin)
    warn(
        "Clock skew: prediction %s says it was created %.0fs %s this machine's clock; deadlines are "
        "counted on this machine's clock regardless",
        prediction.id,
        abs(offset),
        "before" if offset < 0 else "after",
    )


def canceled_at_deadline(prediction: Prediction) -> bool:
    """Return whether the server canceled ``prediction`` at its ``deadline`` (the ``Cancel-After`` sent).

    Replicate cancels a prediction still running at its deadline (one not yet started ends
    ``aborted``), so an edit whose timeout the server reached first ends ``canceled``, as if someone
    had canceled it. Both times are the server's: the answer holds whatever the clocks say.
    """
    if prediction.status is not PredictionStatus.CANCELED:
        return False
    if prediction.deadline is None or prediction.completed_at is None:
        return False
    return _utc(prediction.completed_at) >= _utc(prediction.deadline) - DEADLINE_SLACK


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
