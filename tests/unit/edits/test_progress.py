"""Test ``progress``: what a poll reports, the event dicts, and the shared polling decisions.

``progress``: what a poll reports (``ProgressTracker``), the event dicts, and the polling decisions
shared by the trigger and the operator's in-worker wait (``PredictionPoller``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from airflow_provider_kontext.edits import events, progress
from airflow_provider_kontext.edits.events import (
    EVENT_LOG_TAIL_LINES,
    MAX_EVENT_TEXT,
    error_event,
    prediction_event,
    timeout_event,
)
from airflow_provider_kontext.edits.progress import (
    ADAPTIVE_FIRST_DELAY,
    ADAPTIVE_LATE_DELAY,
    ADAPTIVE_MAX_INTERVALS,
    MAX_LOG_LINE,
    MAX_LOG_LINES_PER_POLL,
    PROGRESS_LOG_SECONDS,
    PredictionPoller,
    Progress,
    ProgressTracker,
    parse_progress,
)
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextDeadlineError,
    FluxKontextNotFoundError,
    FluxKontextRateLimitError,
    FluxKontextServerError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks.api import ClientSettings, get_prediction_request
from airflow_provider_kontext.hooks.retry import Attempts, RetryLimits
from airflow_provider_kontext.models import Prediction

PID = "p1abc"
NOW = 1_700_000_000.0


def make_prediction(status: str, logs: str | None = None, **fields: Any) -> Prediction:
    return Prediction.model_validate({"id": PID, "status": status, "logs": logs, **fields})


@pytest.fixture
def clock():
    """Replace ``time.time()`` in the progress module only with a controllable clock."""
    now = SimpleNamespace(value=NOW)
    fake_time = SimpleNamespace(time=lambda: now.value)
    with mock.patch.object(progress, "time", fake_time):
        yield now


# --- ProgressTracker -------------------------------------------------------------------------------


class TestProgressTracker:
    @pytest.mark.parametrize(
        ("status", "line"),
        [
            ("starting", "is starting"),
            ("processing", "is processing"),
            ("succeeded", "succeeded"),
            ("failed", "failed"),
            ("canceled", "was canceled"),
            ("aborted", "was aborted"),
        ],
    )
    def test_each_status_reads_as_a_sentence(self, status, line):
        assert ProgressTracker(PID).update(make_prediction(status)) == [f"Prediction {PID} {line}"]

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
            f"Prediction {PID} succeeded",
            "model: b",
        ]

    def test_the_end_is_left_out_where_it_is_not_announced(self):
        tracker = ProgressTracker(PID, announce_end=False)
        assert tracker.update(make_prediction("processing", "a\nb")) == [
            f"Prediction {PID} is processing",
            "model: a",
        ]
        assert tracker.update(make_prediction("failed", "a\nb")) == ["model: b"]
        assert tracker.status == "failed"  # still tracked: a timeout message names it

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
    assert event.payload() == {
        "status": "succeeded",
        "prediction_id": PID,
        "model": "black-forest-labs/flux-kontext-dev",
        "output": ["https://replicate.delivery/out.webp"],
        "error": None,
        "logs_tail": "",  # a success's logs were reported while it ran; the event stays small
        "predict_time": 3.5,
        "created_at": "2025-01-01T00:00:00+00:00",
        "completed_at": "2025-01-01T00:00:05+00:00",
        "web_url": "https://replicate.com/p/p1abc",
        "data_removed": False,
        "message": None,
        "revised_prompt": None,
        "shape": None,
        "input_location": None,  # a data: input image has no location (and is never carried)
        "seed": None,  # no "Using seed" line, no seed in the input
        "at_deadline": False,  # not canceled at the deadline its create set
    }
    assert (
        json.loads(json.dumps(event.payload())) == event.payload()
    )  # JSON primitives only (events go to the DB)


@pytest.mark.parametrize(
    ("logs", "given", "seen", "expected"),
    [
        ("Using seed: 4242\n" + "x\n", None, None, 4242),  # a full read's logs
        ("Using seed: 4242\n", 17, None, 4242),  # what the model says wins over what was asked
        (None, 17, None, 17),  # a list answer: no logs, but the input
        (None, "17", None, 17),  # a templated seed arrives as a string
        (None, None, 99, 99),  # an earlier full read showed it; the last answer came from the list
        (None, 0, None, None),  # 0 means random to the model: unknown
        (None, True, None, None),
        ("", None, None, None),
    ],
)
def test_the_event_names_the_seed_however_the_status_was_read(logs, given, seen, expected):
    input_ = {"prompt": "p"} if given is None else {"prompt": "p", "seed": given}
    prediction = make_prediction("succeeded", logs, input=input_, output="https://replicate.delivery/o.png")
    event = prediction_event(prediction, seed=seen)
    assert event.seed == expected
    assert event.summary([])["seed"] == expected


def test_the_poller_keeps_the_seed_its_full_reads_logged_for_a_list_answer():
    poller = PredictionPoller(PID, poll_interval=1.0, end_time=None)
    assert poller.on_prediction(make_prediction("processing", "Using seed: 31337\n")) is None
    event = poller.on_prediction(
        make_prediction("succeeded", None, output="https://replicate.delivery/o.png")
    )
    assert event is not None
    assert event.seed == 31337


def test_an_unsuccessful_events_log_tail_is_short_and_shows_each_bar_once():
    logs = "loading\n" + bars(*range(1, 29)) + "".join(f"note {i}\n" for i in range(12)) + bars(3, 4)
    event = prediction_event(make_prediction("failed", logs + "CUDA out of memory\n"))
    lines = event.logs_tail.splitlines()
    assert len(lines) == EVENT_LOG_TAIL_LINES
    assert lines[-2:] == [bar(4), "CUDA out of memory"]
    assert lines[0] == "note 4"


def test_collapse_progress_bars_keeps_each_runs_last_line():
    lines = ["a", *bars(1, 2, 3).splitlines(), "b", *bars(9).splitlines()]
    assert events.collapse_progress_bars(lines) == ["a", bar(3), "b", bar(9)]


def test_prediction_event_error_text_is_capped_and_stringified():
    long_error = make_prediction("failed", error="E" * (MAX_EVENT_TEXT + 50))
    assert prediction_event(long_error).error == "E" * MAX_EVENT_TEXT
    structured = make_prediction("failed", error={"code": "nsfw"})
    assert prediction_event(structured).error == repr({"code": "nsfw"})
    assert prediction_event(make_prediction("failed", error="")).error is None


def test_timeout_and_error_events():
    timeout = timeout_event(PID, 12.4, "processing")
    assert timeout.status == "timeout"
    assert timeout.prediction_id == PID
    assert "12s" in timeout.message
    assert "processing" in timeout.message
    assert "unknown" in timeout_event(PID, 1, None).message
    error = error_event(PID, "x" * (MAX_EVENT_TEXT + 1))
    assert (error.status, error.prediction_id, error.message) == ("error", PID, "x" * MAX_EVENT_TEXT)


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
        assert poller.on_prediction(make_prediction("succeeded", output="https://x/y.png")).status == (
            "succeeded"
        )

    def test_running_after_deadline_times_out(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW + 10)
        assert poller.on_prediction(make_prediction("starting")) is None
        clock.value = NOW + 10
        event = poller.on_prediction(make_prediction("processing"))
        assert event is not None
        assert event.status == "timeout"
        assert event.prediction_id == PID
        assert "processing" in event.message
        assert "10s" in event.message

    def test_progress_goes_to_the_log(self, clock):
        log = mock.Mock()
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, log=log)
        poller.on_prediction(make_prediction("processing", "hello\n"))
        poller.on_prediction(make_prediction("processing", "hello\n"))
        assert [c.args[0] for c in log.call_args_list] == [f"Prediction {PID} is processing", "model: hello"]

    @pytest.mark.parametrize(
        "exc",
        [
            FluxKontextServerError(status=503),
            FluxKontextTransportError("reset", request_sent=True),
            FluxKontextRateLimitError(status=429),
            FluxKontextAPIError(title="unexpected response"),  # a malformed body: no status
        ],
        ids=["5xx", "transport", "429", "malformed"],
    )
    def test_transient_errors_end_the_wait_once_the_budget_is_spent(self, clock, exc):
        """Check that a transient error reaching the poller has spent the hook's retries.

        The hook retries a failing poll ``max_consecutive_errors`` times (the poller's budget); a
        transient error that still reaches the poller has spent it.
        """
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, max_consecutive_errors=3)
        assert poller.retry_limits == RetryLimits(retries=3, tolerate=True, deadline=None, grace=1.0)
        event = poller.on_error(exc)
        assert event.status == "error"
        assert event.prediction_id == PID
        assert "4 polls in a row failed" in event.message

    def test_the_budget_is_per_poll(self, clock):
        """Each poll gets the whole budget: failures of an earlier poll that ended well do not count."""
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, max_consecutive_errors=2)
        request = get_prediction_request(PID)
        err = FluxKontextServerError(status=502)
        for _ in range(2):  # two polls, each failing twice and then answering
            attempts = Attempts(
                ClientSettings(conn_id="c", base_url="https://x"), request, retry_limits=poller.retry_limits
            )
            assert attempts.after(err) is not None
            assert attempts.after(err) is not None
            assert poller.on_prediction(make_prediction("processing")) is None
        attempts = Attempts(
            ClientSettings(conn_id="c", base_url="https://x"), request, retry_limits=poller.retry_limits
        )
        assert attempts.after(err) is not None
        assert attempts.after(err) is not None
        with pytest.raises(FluxKontextServerError):
            attempts.after(err)

    def test_a_poll_at_the_deadline_times_out(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW + 60)
        assert poller.on_error(FluxKontextDeadlineError("still failing")).status == "timeout"

    @pytest.mark.parametrize(
        "exc",
        [FluxKontextAuthError(status=401, detail="bad token"), FluxKontextNotFoundError(status=404)],
        ids=["auth", "not-found"],
    )
    def test_client_errors_end_the_wait_at_once(self, clock, exc):
        poller = PredictionPoller(PID, poll_interval=1, end_time=None, max_consecutive_errors=10)
        event = poller.on_error(exc)
        assert event is not None
        assert event.status == "error"
        assert str(exc) in event.message
        assert "in a row" not in event.message

    def test_transient_error_after_the_deadline_times_out(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=NOW - 1, max_consecutive_errors=10)
        assert poller.on_error(FluxKontextServerError(status=500)).status == "timeout"


# --- progress bars ---------------------------------------------------------------------------------


def bar(step: int, total: int = 28, rate: str = "2.00it/s") -> str:
    """Return a tqdm line as Replicate's logs show it (the bar's drawing does not matter)."""
    return f"{int(step / total * 100):3d}%|###       | {step}/{total} [00:05<00:09, {rate}]"


def bars(*steps: int, rate: str = "2.00it/s") -> str:
    return "".join(bar(step, rate=rate) + "\n" for step in steps)


class TestParseProgress:
    def test_iterations_per_second(self):
        assert parse_progress(bar(10)) == Progress(10, 28, 0.5)
        assert parse_progress(bar(10)).remaining_seconds == pytest.approx(9.0)

    def test_seconds_per_iteration(self):
        assert parse_progress(bar(3, rate="1.50s/it")) == Progress(3, 28, 1.5)

    def test_unknown_rate(self):
        progress = parse_progress("  0%|          | 0/28 [00:00<?, ?it/s]")
        assert progress == Progress(0, 28, None)
        assert progress.remaining_seconds is None

    def test_real_tqdm_line(self):
        line = " 46%|\u2588\u2588\u2588\u2588\u258b     | 13/28 [00:01<00:01, 9.33it/s]"
        assert parse_progress(line) == Progress(13, 28, pytest.approx(1 / 9.33))

    @pytest.mark.parametrize(
        "line", ["step 1/28", "Using seed: 42", "10%", "a | b | 1/2", "100%|x| 0/0 [00:00<00:00, 1it/s]"]
    )
    def test_other_lines(self, line):
        assert parse_progress(line) is None


class TestProgressBarLines:
    def test_bar_lines_are_held_back_while_running(self, clock):
        tracker = ProgressTracker(PID)
        messages = tracker.update(make_prediction("processing", "Using seed: 7\n" + bars(0, 1, 2, 3)))
        assert messages == [f"Prediction {PID} is processing", "model: Using seed: 7"]
        assert tracker.progress == Progress(3, 28, 0.5)

    def test_only_the_newest_bar_line_when_it_ends(self, clock):
        tracker = ProgressTracker(PID)
        tracker.update(make_prediction("processing", bars(0, 1, 2)))
        clock.value = NOW + 3
        done = make_prediction("succeeded", bars(0, 1, 2, 3, 4) + "saved\n")
        assert tracker.update(done) == [
            f"Prediction {PID} succeeded",
            f"model: {bar(4)}",
            "model: saved",
        ]

    def test_held_bar_line_is_reported_when_it_ends_without_new_ones(self, clock):
        tracker = ProgressTracker(PID)
        tracker.update(make_prediction("processing", bars(0, 1, 2)))
        failed = make_prediction("failed", bars(0, 1, 2) + "CUDA out of memory\n")
        assert tracker.update(failed) == [
            f"Prediction {PID} failed",
            f"model: {bar(2)}",  # where it stood
            "model: CUDA out of memory",
        ]

    def test_one_bar_line_per_interval_while_running(self, clock):
        tracker = ProgressTracker(PID)
        assert tracker.update(make_prediction("processing", bars(0, 1))) == [
            f"Prediction {PID} is processing"
        ]
        clock.value = NOW + PROGRESS_LOG_SECONDS
        assert tracker.update(make_prediction("processing", bars(0, 1, 2, 3))) == [f"model: {bar(3)}"]
        clock.value = NOW + PROGRESS_LOG_SECONDS + 1
        assert tracker.update(make_prediction("processing", bars(0, 1, 2, 3, 4))) == []
        clock.value = NOW + 2 * PROGRESS_LOG_SECONDS
        assert tracker.update(make_prediction("processing", bars(0, 1, 2, 3, 4, 5))) == [f"model: {bar(5)}"]

    def test_separate_runs_of_bars_keep_their_last_lines(self, clock):
        clock.value = NOW
        tracker = ProgressTracker(PID)
        logs = bars(1, 2) + "loaded\n" + bars(3, 4)
        assert tracker.update(make_prediction("succeeded", logs)) == [
            f"Prediction {PID} succeeded",
            f"model: {bar(2)}",
            "model: loaded",
            f"model: {bar(4)}",
        ]


class TestAdaptivePolling:
    def running(self, *steps: int, rate: str = "2.00it/s") -> Prediction:
        return make_prediction("processing", bars(*steps, rate=rate))

    def test_unknown_policy_is_refused(self):
        with pytest.raises(ValueError, match="poll policy"):
            PredictionPoller(PID, poll_interval=1, end_time=None, policy="eager")

    def test_first_poll_waits_a_moment(self, clock):
        assert PredictionPoller(PID, poll_interval=0.5, end_time=None).first_delay() == 0.5
        assert PredictionPoller(PID, poll_interval=30, end_time=None).first_delay() == ADAPTIVE_FIRST_DELAY
        assert PredictionPoller(PID, poll_interval=2, end_time=NOW + 0.25).first_delay() == 0.25
        assert PredictionPoller(PID, poll_interval=2, end_time=None, policy="fixed").first_delay() == 0

    def test_interval_while_nothing_is_known(self, clock):
        poller = PredictionPoller(PID, poll_interval=2, end_time=None)
        assert poller.delay() == 2
        poller.on_prediction(make_prediction("starting"))
        assert poller.delay() == 2
        poller.on_prediction(make_prediction("processing", "step 1/28\n"))  # no progress bar
        assert poller.delay() == 2
        poller.on_prediction(self.running(0, rate="?it/s"))  # a bar without a rate yet
        assert poller.delay() == 2

    def test_polls_when_the_bar_says_it_ends(self, clock):
        poller = PredictionPoller(PID, poll_interval=2, end_time=None)
        poller.on_prediction(self.running(*range(25)))
        # 4 steps of 0.5 s left, and half a step for the line printed up to a step ago
        assert poller.delay() == pytest.approx(4 * 0.5 + 0.25)

    def test_far_end_waits_at_most_a_few_intervals(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=None)
        poller.on_prediction(self.running(1))  # 27 steps of 0.5 s left
        assert poller.delay() == ADAPTIVE_MAX_INTERVALS * 1

    def test_the_estimate_keeps_between_polls_without_new_progress(self, clock):
        poller = PredictionPoller(PID, poll_interval=2, end_time=None)
        poller.on_prediction(self.running(24))
        clock.value = NOW + 1
        poller.on_prediction(self.running(24))  # the same bar line: the same estimated end
        assert poller.delay() == pytest.approx(4 * 0.5 + 0.25 - 1)

    def test_after_the_estimated_end_polls_come_soon_then_back_off(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=None)
        poller.on_prediction(self.running(28))  # all steps done, still finishing up
        clock.value = NOW + 1
        poller.on_prediction(self.running(28))
        delays = [poller.delay() for _ in range(5)]
        assert delays == [ADAPTIVE_LATE_DELAY, 2 * ADAPTIVE_LATE_DELAY, 4 * ADAPTIVE_LATE_DELAY, 1, 1]

    def test_new_progress_resets_the_back_off(self, clock):
        poller = PredictionPoller(PID, poll_interval=1, end_time=None)
        poller.on_prediction(self.running(27))
        clock.value = NOW + 2
        assert poller.delay() == ADAPTIVE_LATE_DELAY
        assert poller.delay() == 2 * ADAPTIVE_LATE_DELAY
        poller.on_prediction(self.running(27, 28))
        clock.value = NOW + 3
        assert poller.delay() == ADAPTIVE_LATE_DELAY

    def test_deadline_still_wins(self, clock):
        poller = PredictionPoller(PID, poll_interval=2, end_time=NOW + 0.1)
        poller.on_prediction(self.running(20))
        assert poller.delay() == pytest.approx(0.1)

    def test_starting_again_forgets_the_estimate(self, clock):
        poller = PredictionPoller(PID, poll_interval=2, end_time=None)
        poller.on_prediction(self.running(20))
        poller.on_prediction(make_prediction("starting"))
        assert poller.delay() == 2

    def test_fixed_policy_ignores_progress(self, clock):
        poller = PredictionPoller(PID, poll_interval=2, end_time=None, policy="fixed")
        poller.on_prediction(self.running(27))
        assert poller.delay() == 2
        clock.value = NOW + 5
        assert poller.delay() == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7),
        ("42", 42),
        (" 9 ", 9),
        (0, None),
        ("0", None),
        (True, None),
        ("x", None),
        (None, None),
        (2.5, None),
    ],
)
def test_a_given_seed_is_a_positive_whole_number_or_unknown(value, expected):
    from airflow_provider_kontext.edits.events import given_seed

    assert given_seed(value) == expected
