"""Decide, for the trigger and the operator's in-worker polling alike, when to poll and what to report.

That is when to poll, how a prediction's progress is reported, and which event ends the wait.

Both paths end in the same :class:`~airflow_provider_kontext.edits.events.PredictionEvent`, so
``FluxKontextEditOperator`` handles them identically.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from airflow_provider_kontext.edits.events import (
    PROGRESS_BAR_LINE,
    SEED_LINE,
    PredictionEvent,
    error_event,
    is_progress_bar,
    prediction_event,
    timeout_event,
)
from airflow_provider_kontext.hooks.retry import RetryLimits, Verdict, classify
from airflow_provider_kontext.models import Prediction, PredictionStatus

#: Longest single log line passed on to the task log.
MAX_LOG_LINE = 500
#: Most new log lines reported per poll (a model that floods its logs cannot flood the task log).
MAX_LOG_LINES_PER_POLL = 40

#: While a prediction runs, progress bar lines are reported at most this often (seconds).
PROGRESS_LOG_SECONDS = 10.0

#: The polling policies of :class:`PredictionPoller`.
POLL_POLICIES = ("adaptive", "fixed")
#: The default policy: fewer requests per edit *and* lower detection latency than a fixed interval.
DEFAULT_POLL_POLICY = "adaptive"
#: Adaptive polling's wait before the first poll (at most one interval), in seconds.
ADAPTIVE_FIRST_DELAY = 1.0
#: Adaptive polling never waits longer than this many poll intervals, however far the estimate.
ADAPTIVE_MAX_INTERVALS = 4.0
#: Adaptive polling's first wait after the estimated end has passed (doubling up to the interval).
ADAPTIVE_LATE_DELAY = 0.2

_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(it/s|s/it)")


class Progress(NamedTuple):
    """A progress bar's state: ``step`` of ``total`` done, at ``seconds_per_step`` (if shown)."""

    step: int
    total: int
    seconds_per_step: float | None

    @property
    def remaining_seconds(self) -> float | None:
        """Seconds until the bar reaches ``total`` at its current rate, if the rate is known."""
        if self.seconds_per_step is None:
            return None
        return max(0, self.total - self.step) * self.seconds_per_step


def parse_progress(line: str) -> Progress | None:
    """Return the progress of a tqdm bar line, or ``None`` if ``line`` is not one."""
    match = PROGRESS_BAR_LINE.match(line)
    if match is None:
        return None
    step, total = int(match.group(1)), int(match.group(2))
    if total <= 0:
        return None
    seconds_per_step = None
    if rate := _RATE.search(match.group(3)):
        value = float(rate.group(1))
        if value > 0:
            seconds_per_step = 1 / value if rate.group(2) == "it/s" else value
    return Progress(step, total, seconds_per_step)


#: How a status change reads in the task log ("Prediction abc succeeded").
_STATUS_WORDS = {
    "starting": "is starting",
    "processing": "is processing",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "was canceled",
    "aborted": "was aborted",
}


class ProgressTracker:
    """What was already reported of one prediction, so each poll reports only what is new.

    That is a status change and log lines that appeared since the last poll.

    Progress bar lines (tqdm's: Replicate's logs hold one per step) supersede each other, so they are
    reported sparingly: of each run of them only the newest, and while the prediction runs at most one
    every :data:`PROGRESS_LOG_SECONDS` (the first after that long); the newest is always reported when
    the prediction ends (logging every step line of many triggers would cost the triggerer much of
    its CPU). Every other model line is reported as it comes.

    :param prediction_id: the prediction reported on.
    :param announce_end: whether the end itself is a line ("Prediction ... succeeded"). A trigger
        leaves it out: the triggerer logs the event it fires, with its status, into the same task
        log, and one log record per trigger is a large part of a triggerer's CPU at many waits.
    """

    def __init__(self, prediction_id: str | None, *, announce_end: bool = True) -> None:
        self.prediction_id = prediction_id
        self.announce_end = announce_end
        self.status: str | None = None
        #: The newest progress bar state seen in the logs, if the model shows one.
        self.progress: Progress | None = None
        #: The seed the model logged ("Using seed: N"), once any read's logs showed it.
        self.seed: int | None = None
        self._logs_seen = 0
        self._bar_logged_at = time.time()
        self._held_bar: str | None = None  # the newest bar line not reported yet

    def update(self, prediction: Prediction) -> list[str]:
        """Return the lines to log for this poll (status change first, then new complete log lines)."""
        messages: list[str] = []
        status = prediction.status.value
        if status != self.status:
            if self.announce_end or not prediction.is_terminal:
                words = _STATUS_WORDS.get(status, f"is {status}")
                messages.append(f"Prediction {self.prediction_id} {words}")
            self.status = status
        logs = prediction.logs
        if logs is None:  # not in this answer (the list endpoint leaves logs out): nothing new
            fresh = ""
        else:
            if len(logs) < self._logs_seen:  # the logs were replaced (e.g. deleted after retention)
                self._logs_seen = 0
            fresh = logs[self._logs_seen :]
        if not prediction.is_terminal:
            # Report only complete lines while running; the last one may still be growing.
            cut = fresh.rfind("\n") + 1
            fresh = fresh[:cut]
        self._logs_seen += len(fresh)
        if self.seed is None and (match := SEED_LINE.search(fresh)):
            self.seed = int(match.group(1))
        lines = self._without_held_bars(
            [line.rstrip() for line in fresh.replace("\r", "\n").split("\n") if line.strip()],
            prediction.is_terminal,
        )
        if len(lines) > MAX_LOG_LINES_PER_POLL:
            messages.append(f"({len(lines) - MAX_LOG_LINES_PER_POLL} model log lines skipped)")
            lines = lines[-MAX_LOG_LINES_PER_POLL:]
        messages.extend(f"model: {line[:MAX_LOG_LINE]}" for line in lines)
        return messages

    def _without_held_bars(self, lines: list[str], terminal: bool) -> list[str]:
        """Return ``lines`` with each run of progress bar lines cut to its last one.

        Bar lines are held back unless it is time to report one; the newest bar state is remembered.
        """
        now = time.time()
        show_bars = terminal or now - self._bar_logged_at >= PROGRESS_LOG_SECONDS
        kept: list[str] = []
        in_bar = False
        newest_bar = None
        for line in lines:
            is_bar = is_progress_bar(line)
            if not is_bar:
                kept.append(line)
            elif not show_bars:
                self._held_bar = line
            elif in_bar:
                kept[-1] = line
            else:
                kept.append(line)
            newest_bar = line if is_bar else newest_bar
            in_bar = is_bar and show_bars
        if newest_bar is not None:
            self.progress = parse_progress(newest_bar)
            if show_bars:
                self._held_bar = None
                self._bar_logged_at = now
        elif terminal and self._held_bar is not None:
            kept.insert(0, self._held_bar)  # where the bar stood when the prediction ended
            self._held_bar = None
        return kept


class PredictionPoller:
    """The decisions of a polling loop, without its I/O.

    The trigger (async) and the operator's in-worker loop (sync) feed it each poll's result and do
    what it says.

    :param prediction_id: the prediction being watched.
    :param poll_interval: seconds between polls.
    :param end_time: Unix time after which the wait ends with a ``timeout`` event (``None``: never).
    :param max_consecutive_errors: retries of one poll that keeps failing transiently (429, 5xx,
        network, an unreadable answer) before the wait ends with an ``error`` event; the deadline
        ends it earlier. The hook spends them (:attr:`retry_limits`): the poll's one retry layer.
    :param log: where progress lines go (``logger.info``).
    :param policy: ``"adaptive"`` (default) or ``"fixed"``; see :meth:`delay`.
    :param announce_end: whether the end is a log line of its own (see :class:`ProgressTracker`).
    """

    def __init__(
        self,
        prediction_id: str,
        *,
        poll_interval: float,
        end_time: float | None,
        max_consecutive_errors: int = 10,
        log: Any = None,
        policy: str = DEFAULT_POLL_POLICY,
        redact: Callable[[str], str] | None = None,
        announce_end: bool = True,
    ) -> None:
        if policy not in POLL_POLICIES:
            raise ValueError(f"poll policy must be one of {', '.join(POLL_POLICIES)}, got {policy!r}")
        self.prediction_id = prediction_id
        self.poll_interval = poll_interval
        self.end_time = end_time
        self.max_consecutive_errors = max_consecutive_errors
        self.policy = policy
        self.tracker = ProgressTracker(prediction_id, announce_end=announce_end)
        self._log = log
        self._redact = redact
        self._started = time.time()
        self._expected_end: float | None = None  # time.time() the progress bar should reach its end
        self._late_polls = 0

    def _deadline_passed(self) -> bool:
        return self.end_time is not None and time.time() >= self.end_time

    def _timeout(self) -> PredictionEvent:
        return timeout_event(self.prediction_id, time.time() - self._started, self.tracker.status)

    def on_prediction(self, prediction: Prediction) -> PredictionEvent | None:
        """Report progress; return the final event if the wait is over, else ``None``."""
        progress_before = self.tracker.progress
        lines = self.tracker.update(prediction)  # also tracks the status the timeout message names
        if self._log is not None:
            for line in lines:
                self._log(line)
        if prediction.is_terminal:
            return prediction_event(prediction, self._redact, seed=self.tracker.seed)
        if self._deadline_passed():
            return self._timeout()
        self._estimate_end(prediction, progress_before)
        return None

    def _estimate_end(self, prediction: Prediction, progress_before: Progress | None) -> None:
        """Update the expected end from the progress bar.

        Local clock only: no server timestamps, so clock skew between the triggerer and the API
        cannot mislead it.
        """
        progress = self.tracker.progress
        remaining = progress.remaining_seconds if progress is not None else None
        if prediction.status is not PredictionStatus.PROCESSING or progress is None or remaining is None:
            self._expected_end = None
            return
        if progress != progress_before or self._expected_end is None:
            # The newest bar line was printed up to one step ago; aim half a step past the estimate.
            step = progress.seconds_per_step or 0.0
            self._expected_end = time.time() + remaining + 0.5 * step
            self._late_polls = 0

    @property
    def retry_limits(self) -> RetryLimits:
        """Return how long the hook keeps trying one poll.

        ``max_consecutive_errors`` retries, unreadable answers included, never waiting past the
        deadline, and an attempt still in flight a moment after it (at most one interval, 1-5 s)
        abandoned; where the account's request budget is short, polls of predictions expected to end
        sooner go first.
        """
        return RetryLimits(
            retries=self.max_consecutive_errors,
            tolerate=True,
            deadline=self.end_time,
            grace=max(1.0, min(self.poll_interval, 5.0)),
            priority=self._expected_end,
        )

    def on_error(self, exc: Exception) -> PredictionEvent:
        """Return the final event for a poll that failed for good.

        The hook already spent :attr:`retry_limits`.

        The deadline reached (or passed while failing): ``timeout``. Anything else: ``error``, saying
        so where the retries ran out.
        """
        from airflow_provider_kontext.exceptions import FluxKontextDeadlineError
        from airflow_provider_kontext.hooks.api import get_prediction_request

        transient = classify(exc, get_prediction_request(self.prediction_id)) is not Verdict.FAIL
        if isinstance(exc, FluxKontextDeadlineError) or (transient and self._deadline_passed()):
            return self._timeout()
        why = f" ({self.max_consecutive_errors + 1} polls in a row failed)" if transient else ""
        return error_event(self.prediction_id, f"Polling prediction {self.prediction_id} failed{why}: {exc}")

    def first_delay(self) -> float:
        """Return the seconds to wait before the first poll.

        ``fixed``: none. ``adaptive``: one interval, at most :data:`ADAPTIVE_FIRST_DELAY` (and never
        past the deadline). The operator created the
        prediction and saw it unfinished a moment ago, so a poll at once would mostly tell only that
        it is still ``starting``; a moment later it is usually ``processing`` with a progress bar to
        time the next poll by, or already finished. Short, so that a prediction finishing quickly
        (or a restarted trigger's) is still seen within an interval.
        """
        if self.policy != "adaptive":
            return 0.0
        delay = min(self.poll_interval, ADAPTIVE_FIRST_DELAY)
        if self.end_time is not None:
            delay = max(0.0, min(delay, self.end_time - time.time()))
        return delay

    def delay(self) -> float:
        """Seconds until the next poll (never past the deadline by more than a moment).

        ``fixed``: the poll interval. ``adaptive``: the same while nothing better is known (a
        prediction ``starting``, or a model without a progress bar); while a progress bar runs, the
        time until its estimated end (from the bar's rate, at most
        :data:`ADAPTIVE_MAX_INTERVALS` intervals), so the poll that sees the result comes right
        after it exists instead of up to an interval later, and the polls in between are skipped.
        Once the estimate has passed (the model finishing up after its last step), polls come
        :data:`ADAPTIVE_LATE_DELAY` apart, doubling up to the interval.
        """
        delay = self.poll_interval
        if self.policy == "adaptive" and self._expected_end is not None:
            until_end = self._expected_end - time.time()
            if until_end > 0:
                delay = min(until_end, ADAPTIVE_MAX_INTERVALS * self.poll_interval)
            else:
                delay = min(self.poll_interval, ADAPTIVE_LATE_DELAY * 2**self._late_polls)
                self._late_polls += 1
        if self.end_time is not None:
            delay = max(0.0, min(delay, self.end_time - time.time()))
        return delay
