"""Test the edit operator waiting in the worker, its deadlines, mapping, templating, extra link.

The hook is a mock and the clock is the test's; nothing touches the network.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone
from unittest import mock

import pendulum
import pytest
from airflow.sdk import DAG

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.exceptions import FluxKontextPredictionFailed
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.links.kontext import FluxKontextPredictionLink
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

from .helpers import (
    OLD_PID,
    OUT_URL,
    PID,
    PROMPT,
    SECRET_ECHO,
    STATE_KEY,
    FakeStore,
    logged,
    make_context,
    make_op,
    make_prediction,
    run_deferring,
    succeeded,
)

# --- waiting in the worker ------------------------------------------------------------------------


def test_non_deferrable_polls_until_terminal(hook, no_sleep):
    hook.create_prediction.return_value = make_prediction("starting")
    hook.get_prediction.side_effect = [
        make_prediction("starting"),
        make_prediction("processing", logs="step 1/28\n"),
        make_prediction("processing", logs="step 1/28\nstep 2/28\n"),
        succeeded(logs="step 1/28\nstep 2/28\n"),
    ]
    op = make_op(deferrable=False, poll_interval=3)
    context = make_context()
    assert op.execute(context) == [OUT_URL]
    assert hook.get_prediction.call_count == 4
    hook.get_prediction.assert_called_with(PID, retry_limits=mock.ANY)
    assert [c.args[0] for c in no_sleep.call_args_list] == [3.0, 3.0, 3.0]
    lines = logged(op)
    assert lines.count(f"Prediction {PID} is processing") == 1
    assert lines.count(f"Prediction {PID} succeeded") == 1
    assert lines.count("model: step 1/28") == 1
    assert lines.count("model: step 2/28") == 1
    assert context["task_state_store"].data[STATE_KEY]["finished"]["try_number"] == 1


def test_non_deferrable_tolerates_transient_errors(hook, no_sleep, requests_mock, monkeypatch):
    """The poll's retries are the real hook's, within the budget the in-worker wait hands it."""
    monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps({"conn_type": "fluxkontext"}))
    monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: None)
    requests_mock.get(
        f"https://api.replicate.com/v1/predictions/{PID}",
        [{"status_code": 502}, {"json": succeeded().model_dump(mode="json")}],
    )
    hook.get_prediction.side_effect = FluxKontextHook().get_prediction
    assert make_op(deferrable=False).execute(make_context()) == [OUT_URL]
    assert requests_mock.call_count == 2


def test_non_deferrable_timeout_cancels(hook, no_sleep):
    created = datetime.now(timezone.utc) - timedelta(minutes=5)
    hook.create_prediction.return_value = make_prediction("processing", created_at=created.isoformat())
    hook.get_prediction.return_value = make_prediction("processing")
    hook.cancel_prediction.return_value = make_prediction("canceled")
    with pytest.raises(FluxKontextPredictionFailed) as info:
        make_op(deferrable=False, timeout=60).execute(make_context())
    assert info.value.status == "timeout"
    hook.cancel_prediction.assert_called_once_with(PID)


def test_on_kill_cancels_running_prediction(hook, no_sleep):
    op = make_op(deferrable=False)
    hook.cancel_prediction.return_value = make_prediction("canceled")
    hook.get_prediction.side_effect = [make_prediction("processing"), make_prediction("canceled")]
    no_sleep.side_effect = lambda _: op.on_kill()  # killed while waiting between polls
    with pytest.raises(FluxKontextPredictionFailed):
        op.execute(make_context())
    hook.cancel_prediction.assert_called_once_with(PID)


def test_on_kill_after_finish_does_nothing(hook, no_sleep):
    hook.get_prediction.return_value = succeeded()
    op = make_op(deferrable=False)
    op.execute(make_context())
    op.on_kill()
    hook.cancel_prediction.assert_not_called()


def test_on_kill_after_failure_does_nothing(hook, no_sleep):
    hook.get_prediction.return_value = make_prediction("failed", error="x")
    op = make_op(deferrable=False)
    with pytest.raises(FluxKontextPredictionFailed):
        op.execute(make_context())
    op.on_kill()
    hook.cancel_prediction.assert_not_called()


def test_on_kill_disabled(hook, no_sleep):
    op = make_op(deferrable=False, cancel_on_kill=False)
    hook.get_prediction.side_effect = [make_prediction("processing"), succeeded()]
    no_sleep.side_effect = lambda _: op.on_kill()
    op.execute(make_context())
    hook.cancel_prediction.assert_not_called()


def test_on_kill_before_create_does_nothing(hook):
    make_op().on_kill()
    hook.cancel_prediction.assert_not_called()


# --- deadlines on our own clock (servers we did not write) ----------------------------------------


@pytest.mark.parametrize("skew_days", [-5, 5])
def test_a_skewed_server_clock_does_not_move_the_deadline(hook, skew_days):
    from airflow_provider_kontext.edits import deadlines

    deadlines._skew_reported.clear()
    created = datetime.now(timezone.utc) + timedelta(days=skew_days)
    hook.create_prediction.return_value = make_prediction("processing", created_at=created.isoformat())
    op = make_op(timeout=300)
    before = time.time()
    deferred = run_deferring(op, make_context())
    end_time = deferred.trigger.serialize()[1]["end_time"]
    assert before + 300 <= end_time <= time.time() + 300
    assert any("Clock skew" in line for line in logged(op, "warning"))


def test_clock_skew_is_reported_once_per_server(hook):
    from airflow_provider_kontext.edits import deadlines

    deadlines._skew_reported.clear()
    created = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    hook.create_prediction.return_value = make_prediction("processing", created_at=created)
    ops = [make_op(timeout=300) for _ in range(2)]
    for op in ops:
        run_deferring(op, make_context())
    assert [sum("Clock skew" in line for line in logged(op, "warning")) for op in ops] == [1, 0]


def test_the_servers_deadline_only_brings_ours_closer(hook):
    # The server grants 60 s (its deadline less its created_at), counted on our clock even though
    # its clock is a day behind; a grant longer than the timeout changes nothing.
    created = datetime.now(timezone.utc) - timedelta(days=1)
    for granted, expected in ((60, 60), (900, 300), (-30, 300)):
        hook.create_prediction.return_value = make_prediction(
            "processing",
            created_at=created.isoformat(),
            deadline=(created + timedelta(seconds=granted)).isoformat(),
        )
        before = time.time()
        end_time = run_deferring(make_op(timeout=300), make_context()).trigger.serialize()[1]["end_time"]
        assert before + expected <= end_time <= time.time() + expected, granted


def test_an_unreadable_server_deadline_is_ignored(hook):
    hook.create_prediction.return_value = make_prediction("processing", deadline="next tuesday")
    before = time.time()
    end_time = run_deferring(make_op(timeout=300), make_context()).trigger.serialize()[1]["end_time"]
    assert before + 300 <= end_time <= time.time() + 300


def test_the_in_worker_wait_uses_our_clock_too(hook, no_sleep):
    created = (datetime.now(timezone.utc) - timedelta(days=5)).isoformat()
    hook.create_prediction.return_value = make_prediction("processing", created_at=created)
    hook.get_prediction.side_effect = [make_prediction("processing", created_at=created), succeeded()]
    assert make_op(deferrable=False, timeout=300).execute(make_context()) == [OUT_URL]


def test_a_retry_that_reattaches_keeps_the_first_deadline(hook, first_try):
    first_deadline = first_try.data[STATE_KEY]["deadline"]
    hook.get_prediction.return_value = make_prediction("processing", OLD_PID)
    deferred = run_deferring(make_op(), make_context(first_try))
    assert deferred.trigger.serialize()[1]["end_time"] == first_deadline
    hook.create_prediction.assert_not_called()


def test_an_entry_without_a_deadline_gets_a_fresh_one(hook):
    store = FakeStore()
    run_deferring(make_op(timeout=300), make_context(store))
    entry = store.data[STATE_KEY]
    store.data[STATE_KEY] = {"id": entry["id"], "fingerprint": entry["fingerprint"]}
    hook.get_prediction.return_value = make_prediction("processing")
    before = time.time()
    end_time = run_deferring(make_op(timeout=300), make_context(store)).trigger.serialize()[1]["end_time"]
    assert before + 300 <= end_time <= time.time() + 300


# --- mapping, templating, extra link --------------------------------------------------------------


def test_mapped_over_input_images():
    images = ["https://example.com/1.png", "https://example.com/2.png"]
    with DAG("kontext_mapped", schedule=None, start_date=pendulum.datetime(2025, 1, 1)):
        mapped = FluxKontextEditOperator.partial(
            task_id="edit", prompt=PROMPT, aspect_ratio="1:1", output_path="/tmp/out"
        ).expand(input_image=images)
    assert mapped.operator_class is FluxKontextEditOperator
    assert mapped.partial_kwargs["prompt"] == PROMPT
    assert mapped.partial_kwargs["aspect_ratio"] == "1:1"
    assert mapped.partial_kwargs["output_path"] == "/tmp/out"
    assert mapped.expand_input.value == {"input_image": images}
    # Carried by the mapped task itself: Airflow renders the template from it, before unmapping.
    # Airflow 3.1's .partial() takes only BaseOperator's defaults, not an operator's own (docs/operators.md).
    from airflow.sdk.bases import operator as sdk_operator

    takes_operator_defaults = hasattr(sdk_operator, "_get_operator_defaults")
    expected = "{{ task.input_label }}" if takes_operator_defaults else None
    assert mapped.map_index_template == expected


@pytest.mark.parametrize(
    ("image", "label"),
    [
        ("/data/shots/mug.png", "mug.png"),
        ("https://cdn.example/a/mug.webp?sig=x", "mug.webp"),
        ("data:image/png;base64,iVBORw0KGgo=", "data:image/png,..."),
        (b"\x89PNG....", "8 bytes"),
    ],
)
def test_a_mapped_edit_shows_its_input_name(image, label):
    """Airflow renders ``map_index_template`` with the task's rendered fields before ``execute``."""
    from airflow.sdk.definitions._internal.templater import SandboxedEnvironment

    op = make_op()
    op.input_image = image
    assert op.map_index_template == "{{ task.input_label }}"
    assert SandboxedEnvironment().from_string(op.map_index_template).render(task=op) == label


def test_a_dags_own_map_index_template_wins():
    assert make_op(map_index_template="{{ task.prompt }}").map_index_template == "{{ task.prompt }}"


def test_deferring_says_what_is_awaited_how_and_until_when(hook):
    op = make_op(poll_interval=1.5, timeout=600)
    before = time.time()
    run_deferring(op, make_context())
    (line,) = [line for line in logged(op) if line.startswith("Waiting")]
    deadline = datetime.fromtimestamp(before + 600, timezone.utc)
    assert line.startswith(
        f"Waiting in the triggerer for prediction {PID} (starting); "
        "poll policy adaptive, interval 1.5s; deadline "
    )
    assert deadline.strftime("%Y-%m-%d %H:%M") in line
    # The URL ends the line: a linkifier takes everything up to the next space into the link.
    assert line.endswith(
        (f"(in 0:10:00) at https://replicate.com/p/{PID}", f"(in 0:09:59) at https://replicate.com/p/{PID}")
    )


def test_urls_in_log_lines_are_never_followed_by_punctuation(hook):
    r"""Airflow's log view links ``https?://\\S+``: a URL followed by ``;`` or ``,`` links to a 404."""
    from airflow_provider_kontext.edits.results import _success_line

    op = make_op(poll_interval=1.5, timeout=600)
    run_deferring(op, make_context())
    summary = {"id": PID, "status": "succeeded", "predict_time": 1.0, "seed": 7, "outputs": []}
    summary["outputs"] = [f"https://replicate.delivery/{i}.png" for i in range(7)]
    lines = [*logged(op), _success_line(summary, saved=False)]
    urls = [url for line in lines for url in re.findall(r"https?://\S+", line)]
    assert len(urls) >= 6
    assert all(re.fullmatch(r"https?://[\w./-]+", url) for url in urls), urls
    assert "with seed 7" in lines[-1]


def test_template_fields_cover_the_inputs():
    fields = set(FluxKontextEditOperator.template_fields)
    assert {"prompt", "input_image", "extra_input", "output_path", "num_inference_steps", "seed"} <= fields


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (f"https://replicate.com/p/{PID}", f"https://replicate.com/p/{PID}"),
        (None, ""),
        ("javascript:alert(1)", ""),
    ],
)
def test_extra_link_reads_the_web_url(stored, expected):
    op = make_op()
    [link] = op.operator_extra_links
    assert isinstance(link, FluxKontextPredictionLink)
    ti_key = mock.Mock(name="ti_key")
    with mock.patch("airflow_provider_kontext.links.kontext.XCom.get_value", return_value=stored) as get:
        assert link.get_link(op, ti_key=ti_key) == expected
    get.assert_called_once_with(ti_key=ti_key, key="prediction_web_url")


@pytest.mark.parametrize(
    ("known", "expected"),
    [
        (f"https://replicate.com/p/{PID}", f"https://replicate.com/p/{PID}"),
        ("javascript:alert(1)", ""),
    ],
)
def test_extra_link_takes_the_web_url_this_start_learnt_without_reading_xcom(hook, known, expected):
    op = make_op()
    hook.create_prediction.return_value = make_prediction("starting", urls={"web": known})
    run_deferring(op, make_context())
    [link] = op.operator_extra_links
    with mock.patch("airflow_provider_kontext.links.kontext.XCom.get_value") as get:
        assert link.get_link(op, ti_key=mock.Mock(name="ti_key")) == expected
    get.assert_not_called()


def test_extra_link_after_a_resume_takes_the_events_web_url(hook):
    op = make_op()
    op.execute_complete(make_context(), prediction_event(succeeded()))
    [link] = op.operator_extra_links
    with mock.patch("airflow_provider_kontext.links.kontext.XCom.get_value") as get:
        assert link.get_link(op, ti_key=mock.Mock(name="ti_key")) == f"https://replicate.com/p/{PID}"
    get.assert_not_called()


def test_in_worker_polling_redacts_a_secret_echoed_into_a_failed_prediction(hook, no_sleep):
    hook.get_prediction.return_value = make_prediction(
        "failed", error=f"upstream rejected Bearer {SECRET_ECHO}", logs=f"{SECRET_ECHO}\n"
    )
    with pytest.raises(FluxKontextPredictionFailed) as info:
        make_op(deferrable=False).execute(make_context())
    assert SECRET_ECHO not in str(info.value)
    assert "Bearer ***" in str(info.value)


def test_a_transient_storage_error_reading_the_image_is_retryable(hook):
    """An I/O hiccup (e.g. s3fs's OSError) is not bad input: the task fails normally so retries apply."""

    class FlakyStorage:
        def __str__(self) -> str:
            return "s3://bucket/shots/mug.png"

        def read_bytes(self) -> bytes:
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error") as info:
        make_op(input_image=FlakyStorage()).execute(make_context())
    assert not isinstance(info.value, AirflowFailException)
    hook.create_prediction.assert_not_called()


@pytest.mark.parametrize(
    ("status", "retry_failed_predictions", "no_retry"),
    [
        ("failed", False, True),
        ("canceled", False, True),
        ("aborted", False, False),  # never started, never billed: a retry costs nothing extra
        ("failed", True, False),
        ("canceled", True, False),
    ],
)
def test_model_failures_fail_without_retry_unless_asked(hook, status, retry_failed_predictions, no_retry):

    event = prediction_event(make_prediction(status, error="NSFW content detected."))
    op = make_op(retry_failed_predictions=retry_failed_predictions)
    with pytest.raises(FluxKontextPredictionFailed) as info:
        op.execute_complete(make_context(), event)
    assert isinstance(info.value, AirflowFailException) is no_retry
    assert info.value.status == status
