"""``progress``: what a poll reports (``ProgressTracker``), the event dicts, and the polling decisions
shared by the trigger and the operator's in-worker wait (``PredictionPoller``)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from airflow_provider_kontext import progress
from airflow_provider_kontext.exceptions import (
    KontextAPIError,
    KontextAuthError,
    KontextNotFoundError,
    KontextRateLimitError,
    KontextServerError,
    KontextTransportError,
)
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.progress import (
    MAX_EVENT_TEXT,
    MAX_LOG_LINE,
    MAX_LOG_LINES_PER_POLL,
    PredictionPoller,
    ProgressTracker,
    error_event,
    prediction_event,
    timeout_event,
)

PID = "p1abc"
NOW = 1_700_000_000.0


def make_prediction(status: str, logs: str | None = None, **fields: Any) -> Prediction:
    return Prediction.model_validate({"id": PID, "status": status, "logs": logs, **fields})


@pytest.fixture
def clock():
    """A controllable ``time.time()`` for the progress module only."""
    now = SimpleNamespace(value=NOW)
    fake_time = SimpleNamespace(time=lambda: now.value)
    with mock.patch.object(progress, "time", fake_time):
        yield now


# --- ProgressTracker -------------------------------------------------------------------------------


class TestProgressTracker:
    def test_status_change_reported_once(self):
        tracker = ProgressTracker(PID)
        assert tracker.update(make_prediction("starting")) == [f"Prediction {PID} is starting"]
        assert tracker.update(make_prediction("starting")) == []
        assert tracker.update(make_prediction("processing")) == [f"Prediction {PID} is processing"]
        assert tracker.status == "processing"

    def test_only_complete_new_lines_while_running(self):
        tracker = ProgressTracker(PID)
        first = tracker.update(make_prediction("processing", "step 1\nstep 2\nste"))
        assert first == [f"Prediction {PID} is processing", "model: step 1", "model: step 2"]
        # The half-written line is reported once it is complete, and the old lines not again.
        assert tracker.update(make_prediction("processing", "step 1\nstep 2\nstep 3\n")) == ["model: step 3"]
        assert tracker.update(make_prediction("processing", "step 1\nstep 2\nstep 3\n")) == []

    def test_partial_line_not_reported_until_complete(self):
        tracker = ProgressTracker(PID)
        tracker.update(make_prediction("processing", "loading"))
        assert tracker.update(make_prediction("processing", "loading weights")) == []
        assert tracker.update(make_prediction("processing", "loading weights\n")) == [
            "model: loading weights"
        ]

    def test_terminal_flushes_the_unfinished_last_line(self):
        tracker = ProgressTracker(PID)
        tracker.update(make_prediction("processing", "a\nb"))
        assert tracker.update(make_prediction("succeeded", "a\nb")) == [
            f"Prediction {PID} is succeeded",
            "model: b",
        ]

    def test_caps_lines_per_poll_keeping_the_newest(self):
        count = MAX_LOG_LINES_PER_POLL + 25
        logs = "".join(f"line {i}\n" for i in range(count))
        tracker = ProgressTracker(PID)
        messages = tracker.update(make_prediction("processing", logs))
        assert messages[0] == f"Prediction {PID} is processing"
        assert messages[1] == "(25 model log lines skipped)"
        assert messages[2:] == [f"model: line {i}" for i in range(25, count)]
        assert len(messages) == 2 + MAX_LOG_LINES_PER_POLL
        # The skipped lines are not reported later either.
        assert tracker.update(make_prediction("processing", logs + "next\n")) == ["model: next"]

    def test_exactly_the_cap_skips_nothing(self):
        logs = "".join(f"l{i}\n" for i in range(MAX_LOG_LINES_PER_POLL))
        messages = ProgressTracker(PID).update(make_prediction("processing", logs))
        assert len(messages) == 1 + MAX_LOG_LINES_PER_POLL
        assert not any("skipped" in m for m in messages)

    def test_logs_that_shrink_are_read_from_the_start(self):
        tracker = ProgressTracker(PID)
        tracker.update(make_prediction("processing", "a long first line\nsecond line\n"))
        # Replaced by something shorter: the new text is reported rather than skipped.
        assert tracker.update(make_prediction("processing", "restarted\n")) == ["model: restarted"]
        assert tracker.update(make_prediction("processing", "restarted\nnext\n")) == ["model: next"]

    def test_logs_removed_then_new_ones(self):
        tracker = ProgressTracker(PID)
        tracker.update(make_prediction("processing", "one\ntwo\n"))
        assert tracker.update(make_prediction("processing", None)) == []
        assert tracker.update(make_prediction("processing", "x\n")) == ["model: x"]

    def test_carriage_returns_and_blank_lines(self):
        messages = ProgressTracker(PID).update(
            make_prediction("processing", "10%\r50%\r100%\n\n   \ndone \n")
        )
        assert messages[1:] == ["model: 10%", "model: 50%", "model: 100%", "model: done"]

    def test_long_lines_are_truncated(self):
        messages = ProgressTracker(PID).update(
            make_prediction("processing", "x" * (MAX_LOG_LINE + 100) + "\n")
        )
        assert messages[1] == "model: " + "x" * MAX_LOG_LINE


# --- event dicts -----------------------------------------------------------------------------------


def test_prediction_event_fields():
    prediction = make_prediction(
        "succeeded",
        "a\nb\n",
        model="black-forest-labs/flux-kontext-dev",
        input={"input_image": "data:image/png;base64," + "A" * 1000},
        output="https://replicate.delivery/out.webp",
        metrics={"predict_time": 3.5},
        created_at="2025-01-01T00:00:00+00:00",
        completed_at="2025-01-01T00:00:05+00:00",
        urls={"web": "https://replicate.com/p/p1abc"},
    )
    event = prediction_event(prediction)
    assert event == {
        "status": "succeeded",
        "prediction_id": PID,
        "model": "black-forest-labs/flux-kontext-dev",
        "output": ["https://replicate.delivery/out.webp"],
        "error": None,
        "logs_tail": "a\nb",
        "predict_time": 3.5,
        "created_at": "2025-01-01T00:00:00+00:00",
        "completed_at": "2025-01-01T00:00:05+00:00",
        "web_url": "https://replicate.com/p/p1abc",
        "data_removed": False,
    }
    assert json.loads(json.dumps(event)) == event  # JSON primitives only (events go to the DB)


def test_prediction_event_error_text_is_capped_and_stringified():
    long_error = make_prediction("failed", error="E" * (MAX_EVENT_TEXT + 50))
    assert prediction_event(long_error)["error"] == "E" * MAX_EVENT_TEXT
    structured = make_prediction("failed", error={"code": "nsfw"})
    assert prediction_event(structured)["error"] == repr({"code": "nsfw"})
    assert prediction_event(make_prediction("failed", error=""))["error"] is None


def test_timeout_and_error_events():
    timeout = timeout_event(PID, 12.4, "processing")
    assert timeout["status"] == "timeout"
    assert timeout["prediction_id"] == PID
    assert "12s" in timeout["message"]
    assert "processing" in timeout["message"]
    assert "unknown" in timeout_event(PID, 1, None)["message"]
    error = error_event(PID, "x" * (MAX_EVENT_TEXT + 1))
    assert error == {"status": "error", "prediction_id": PID, "message": "x" * MAX_EVENT_TEXT}


# --- PredictionPoller ------------------------------------------------------------------------------


class TestPredictionPollerDelay:
    def test_no_deadline_waits_the_interval(self, clock):
        assert PredictionPoller(PID, poll_interval=7.0, end_time=None).delay() == 7.0

    def test_far_deadline_waits_the_interval(self, clock):
        assert PredictionPoller(PID, poll_interval=7.0, end_time=NOW + 100).delay() == 7.0

    def test_never_overshoots_the_deadline(self, clock):
        poller = PredictionPoller(PID, poll_interval=7.0, end_time=NOW + 2.5)
        assert poller.delay() == pytest.approx(2.5)
        clock.value = NOW + 2.0
        assert poller.delay() == pytest.approx(0.5)

    def test_deadline_passed_means_no_wait(self, clock):
        poller = PredictionPoller(PID, poll_interval=7.0, end_time=NOW - 30)
        assert poller.delay() == 0.0


class TestPredictionPollerDecisions:
    def test_running_before_deadline_polls_again(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW + 60)
        assert poller.on_prediction(make_prediction("processing")) is None

    @pytest.mark.parametrize("status", ["succeeded", "failed", "canceled", "aborted"])
    def test_terminal_gives_the_prediction_event(self, clock, status):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW + 60)
        prediction = make_prediction(status, error="boom" if status != "succeeded" else None)
        assert poller.on_prediction(prediction) == prediction_event(prediction)

    def test_terminal_wins_over_a_passed_deadline(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW - 1)
        assert poller.on_prediction(make_prediction("succeeded", output="https://x/y.png"))["status"] == (
            "succeeded"
        )

    def test_running_after_deadline_times_out(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW + 10)
        assert poller.on_prediction(make_prediction("starting")) is None
        clock.value = NOW + 10
        event = poller.on_prediction(make_prediction("processing"))
        assert event is not None
        assert event["status"] == "timeout"
        assert event["prediction_id"] == PID
        assert "processing" in event["message"]
        assert "10s" in event["message"]

    def test_progress_goes_to_the_log(self, clock):
        log = mock.Mock()
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, log=log)
        poller.on_prediction(make_prediction("processing", "hello\n"))
        poller.on_prediction(make_prediction("processing", "hello\n"))
        assert [c.args[0] for c in log.call_args_list] == [f"Prediction {PID} is processing", "model: hello"]

    @pytest.mark.parametrize(
        "exc",
        [
            KontextServerError(status=503),
            KontextTransportError("reset", request_sent=True),
            KontextRateLimitError(status=429),
            KontextAPIError(title="unexpected response"),  # a malformed body: no status
        ],
        ids=["5xx", "transport", "429", "malformed"],
    )
    def test_transient_errors_tolerated_up_to_the_limit(self, clock, exc):
        log = mock.Mock()
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, max_consecutive_errors=3, log=log)
        assert [poller.on_error(exc) for _ in range(3)] == [None, None, None]
        assert log.call_count == 3
        event = poller.on_error(exc)
        assert event is not None
        assert event["status"] == "error"
        assert event["prediction_id"] == PID
        assert "4 polls in a row failed" in event["message"]

    def test_a_good_poll_resets_the_error_count(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, max_consecutive_errors=2)
        err = KontextServerError(status=502)
        assert poller.on_error(err) is None
        assert poller.on_error(err) is None
        assert poller.on_prediction(make_prediction("processing")) is None
        assert poller.on_error(err) is None
        assert poller.on_error(err) is None
        assert poller.on_error(err)["status"] == "error"

    @pytest.mark.parametrize(
        "exc",
        [KontextAuthError(status=401, detail="bad token"), KontextNotFoundError(status=404)],
        ids=["auth", "not-found"],
    )
    def test_client_errors_end_the_wait_at_once(self, clock, exc):
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, max_consecutive_errors=10)
        event = poller.on_error(exc)
        assert event is not None
        assert event["status"] == "error"
        assert str(exc) in event["message"]
        assert "in a row" not in event["message"]

    def test_transient_error_after_the_deadline_times_out(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW - 1, max_consecutive_errors=10)
        assert poller.on_error(KontextServerError(status=500))["status"] == "timeout"
