"""Test the edit operator's deferral, its reattach on retry, and an uncertain create.

The hook is a mock; nothing sleeps or touches the network.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from unittest import mock

import pytest

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextServerError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import UploadedFile
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

from .helpers import (
    NEW_PID,
    OLD_PID,
    OUT_URL,
    PID,
    PNG,
    STATE_KEY,
    TOKEN,
    FakeStore,
    logged,
    make_context,
    make_op,
    make_prediction,
    pushed,
    run_deferring,
    succeeded,
)

# --- deferral -------------------------------------------------------------------------------------


def test_defers_with_trigger_kwargs(hook):
    created = datetime.now(timezone.utc) - timedelta(seconds=5)
    hook.create_prediction.return_value = make_prediction("starting", created_at=created.isoformat())
    op = make_op(flux_kontext_conn_id="kontext_prod", poll_interval=4, timeout=300, cancel_on_kill=False)
    before = time.time()
    deferred = run_deferring(op, make_context())
    trigger = deferred.trigger
    assert isinstance(trigger, FluxKontextPredictionTrigger)
    assert deferred.method_name == "execute_complete"
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_kontext.triggers.kontext.FluxKontextPredictionTrigger"
    assert kwargs["prediction_id"] == PID
    assert kwargs["flux_kontext_conn_id"] == "kontext_prod"
    assert kwargs["poll_interval"] == 4.0
    assert kwargs["cancel_on_kill"] is False
    # The deadline counts from when the create returned, on this machine's clock (not the server's).
    assert before + 300 <= kwargs["end_time"] <= time.time() + 300
    # Airflow's own deferral timeout is only a backstop, later than the trigger's deadline.
    assert deferred.timeout.total_seconds() > kwargs["end_time"] - time.time()


def test_no_secret_in_the_trigger(hook, monkeypatch):
    conn = {"conn_type": "fluxkontext", "host": "https://api.replicate.com", "password": TOKEN}
    monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
    real = FluxKontextHook()
    assert real.settings.token == TOKEN  # the connection really carries the token
    with mock.patch.object(FluxKontextEditOperator, "hook", real):
        with mock.patch.object(real, "create_prediction", return_value=make_prediction("starting")):
            context = make_context()
            deferred = run_deferring(make_op(), context)
    trigger = deferred.trigger
    assert trigger.serialize()[1]["flux_kontext_conn_id"] == "flux_kontext_default"
    assert TOKEN not in json.dumps(trigger.serialize())
    assert TOKEN not in repr(trigger)
    assert TOKEN not in json.dumps(pushed(context))
    kwargs = trigger.serialize()[1]
    hook_params = kwargs.pop("hook_params")
    for value in [*kwargs.values(), *hook_params.values()]:
        assert value is None or type(value) in (str, int, float, bool)


def test_ids_pushed_right_after_create(hook):
    context = make_context()
    run_deferring(make_op(), context)
    assert pushed(context) == {"prediction_id": PID, "prediction_web_url": f"https://replicate.com/p/{PID}"}


def test_state_store_written_before_deferral(hook):
    context = make_context()
    run_deferring(make_op(), context)
    store = context["task_state_store"]
    saved = store.data[STATE_KEY]
    assert saved["id"] == PID
    assert isinstance(saved["fingerprint"], str)
    assert len(saved["fingerprint"]) == 64
    assert ("set", STATE_KEY) in store.calls


def test_a_whole_edit_reads_the_store_once_per_task_start(hook):
    """Every store call is a request to Airflow's API server: one read per start, and the writes."""
    from airflow_provider_kontext.edits.events import prediction_event

    store = FakeStore()
    run_deferring(make_op(), make_context(store))
    assert store.calls == [("get", STATE_KEY), ("set", STATE_KEY), ("set", STATE_KEY)]  # mark, id
    store.calls.clear()
    make_op().execute_complete(make_context(store), prediction_event(succeeded()))
    assert store.calls == [("get", STATE_KEY), ("set", STATE_KEY)]  # marked finished
    assert store.data[STATE_KEY]["id"] == PID
    assert store.data[STATE_KEY]["finished"]["try_number"] == 1


def test_create_failure_that_may_have_created_leaves_the_create_marker(hook):
    """A 5xx does not prove nothing was created: the retry must know to search for it."""
    hook.create_prediction.side_effect = FluxKontextServerError(status=503)
    context = make_context()
    with pytest.raises(FluxKontextServerError):
        make_op().execute(context)
    assert set(context["task_state_store"].data[STATE_KEY]) == {"creating"}


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (FluxKontextAuthError(status=401, method="POST", path="/v1/x"), "the token is refused"),
        (FluxKontextAuthError(status=403), "the token is refused"),
        (FluxKontextNotFoundError(status=404), "the model or version does not exist"),
        (FluxKontextAPIError(status=422, title="Unprocessable Entity"), "the server rejects this input"),
    ],
)
def test_a_create_answer_no_retry_can_change_fails_without_retries(hook, error, why):
    hook.create_prediction.side_effect = error
    context = make_context()
    with pytest.raises(AirflowFailException) as info:
        make_op().execute(context)
    assert type(info.value) is AirflowFailException  # Airflow does not retry it
    message = str(info.value)
    assert message.startswith(str(error))
    assert f"Not retried: the create would get the same answer ({why}" in message
    assert info.value.__cause__ is None  # one short traceback
    assert info.value.__suppress_context__
    assert context["task_state_store"].data == {}


def test_an_upload_refused_fails_without_retries(hook, tmp_path):
    image = tmp_path / "big.png"
    image.write_bytes(PNG + bytes(1024))
    hook.upload_file.side_effect = FluxKontextAuthError(status=401)
    with pytest.raises(AirflowFailException, match="Not retried: the upload would get the same answer"):
        make_op(input_image=str(image), inline_image_max_bytes=10).execute(make_context())
    hook.create_prediction.assert_not_called()


@pytest.mark.parametrize("status", [400, 409, 429, 500])
def test_other_create_answers_keep_their_retries(hook, status):
    error = (FluxKontextServerError if status >= 500 else FluxKontextAPIError)(status=status)
    hook.create_prediction.side_effect = error
    with pytest.raises(FluxKontextAPIError):
        make_op().execute(make_context())


# --- reattach on retry ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["starting", "processing"])
def test_reattach_to_running_prediction(hook, first_try, status):
    hook.get_prediction.return_value = make_prediction(status, OLD_PID)
    context = make_context(first_try)
    op = make_op()
    deferred = run_deferring(op, context)
    hook.create_prediction.assert_not_called()
    hook.get_prediction.assert_called_once_with(OLD_PID)
    assert deferred.trigger.serialize()[1]["prediction_id"] == OLD_PID
    assert pushed(context)["prediction_id"] == OLD_PID  # pushed again: try 1's XComs are gone
    assert any("Reattaching to prediction" in line for line in logged(op))


def test_reattach_with_local_image_does_not_upload_again(hook, tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(PNG + bytes(5000))
    hook.upload_file.return_value = UploadedFile.model_validate({"id": "f", "urls": {"get": "https://f/1"}})
    hook.create_prediction.return_value = make_prediction("processing", OLD_PID)
    store = FakeStore()
    run_deferring(make_op(input_image=image, inline_image_max_bytes=100), make_context(store))
    assert hook.upload_file.call_count == 1
    hook.get_prediction.return_value = make_prediction("processing", OLD_PID)
    deferred = run_deferring(make_op(input_image=image, inline_image_max_bytes=100), make_context(store))
    assert deferred.trigger.prediction_id == OLD_PID
    assert hook.upload_file.call_count == 1
    assert hook.create_prediction.call_count == 1


def test_reattach_to_succeeded_prediction_returns_its_output(hook, first_try):
    hook.get_prediction.return_value = succeeded(OLD_PID)
    context = make_context(first_try)
    assert make_op().execute(context) == [OUT_URL]
    hook.create_prediction.assert_not_called()
    assert pushed(context)["prediction"]["id"] == OLD_PID
    assert first_try.data[STATE_KEY]["finished"]["try_number"] == 1  # kept until Airflow has the success


def test_succeeded_but_output_deleted_creates_new(hook, first_try):
    hook.get_prediction.return_value = succeeded(OLD_PID, output=None, data_removed=True)
    deferred = run_deferring(make_op(), make_context(first_try))
    hook.create_prediction.assert_called_once()
    assert deferred.trigger.prediction_id == NEW_PID


@pytest.mark.parametrize("status", ["failed", "canceled", "aborted"])
def test_ended_prediction_creates_new(hook, first_try, status):
    hook.get_prediction.return_value = make_prediction(status, OLD_PID, error="boom")
    deferred = run_deferring(make_op(), make_context(first_try))
    hook.create_prediction.assert_called_once()
    assert deferred.trigger.prediction_id == NEW_PID
    assert first_try.data[STATE_KEY]["id"] == NEW_PID


def test_changed_inputs_create_new(hook, first_try):
    op = make_op(prompt="Make it a sunny summer scene")
    deferred = run_deferring(op, make_context(first_try))
    hook.get_prediction.assert_not_called()
    hook.create_prediction.assert_called_once()
    assert deferred.trigger.prediction_id == NEW_PID
    assert any("Inputs changed" in line for line in logged(op, "warning"))


def test_changed_local_image_creates_new(hook, tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(PNG)
    hook.create_prediction.return_value = make_prediction("processing", OLD_PID)
    store = FakeStore()
    run_deferring(make_op(input_image=image), make_context(store))
    image.write_bytes(PNG + b"changed")  # same path, other content
    hook.create_prediction.return_value = make_prediction("starting", NEW_PID)
    deferred = run_deferring(make_op(input_image=image), make_context(store))
    hook.get_prediction.assert_not_called()
    assert deferred.trigger.prediction_id == NEW_PID


def test_vanished_prediction_creates_new(hook, first_try):
    hook.get_prediction.side_effect = FluxKontextNotFoundError(status=404)
    op = make_op()
    deferred = run_deferring(op, make_context(first_try))
    hook.create_prediction.assert_called_once()
    assert deferred.trigger.prediction_id == NEW_PID
    assert any("no longer exists" in line for line in logged(op, "warning"))


def test_reattach_disabled_always_creates(hook, first_try):
    hook.get_prediction.return_value = make_prediction("processing", OLD_PID)
    calls_before = list(first_try.calls)
    deferred = run_deferring(make_op(reattach_on_retry=False), make_context(first_try))
    hook.create_prediction.assert_called_once()
    hook.get_prediction.assert_not_called()
    assert deferred.trigger.prediction_id == NEW_PID
    assert first_try.calls == calls_before  # the store is neither read nor written


def test_no_store_in_context_creates_and_warns(hook):
    op = make_op()
    context = make_context(store=None)
    deferred = run_deferring(op, context)
    hook.create_prediction.assert_called_once()
    assert deferred.trigger.prediction_id == PID
    assert any("No task state store" in line for line in logged(op, "warning"))


def test_malformed_store_value_is_ignored(hook):
    store = FakeStore({STATE_KEY: "not-a-dict"})
    run_deferring(make_op(), make_context(store))
    hook.get_prediction.assert_not_called()
    hook.create_prediction.assert_called_once()


# --- uncertain create -----------------------------------------------------------------------------


def test_uncertain_create_fails_without_retry_by_default(hook):
    hook.create_prediction.side_effect = FluxKontextPredictionMayExistError("read timed out after sending")
    context = make_context()
    with pytest.raises(AirflowFailException, match="read timed out after sending") as info:
        make_op().execute(context)
    assert "retry_uncertain_create" in str(info.value)
    assert isinstance(info.value.__cause__, FluxKontextPredictionMayExistError)
    # Kept for a clear or retry to search the list for the prediction the create may have made.
    assert set(context["task_state_store"].data[STATE_KEY]) == {"creating"}


def test_uncertain_create_reraised_when_retries_allowed(hook):
    error = FluxKontextPredictionMayExistError("read timed out after sending")
    hook.create_prediction.side_effect = error
    with pytest.raises(FluxKontextPredictionMayExistError) as info:
        make_op(retry_uncertain_create=True).execute(make_context())
    assert info.value is error
