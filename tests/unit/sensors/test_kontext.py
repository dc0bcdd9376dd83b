"""Test ``FluxKontextPredictionSensor`` with the hook replaced by a mock.

``FluxKontextPredictionSensor`` with the hook replaced by a mock: the first poll, deferral with the
trigger, poking in the worker, completion shared with the operator, timeout and soft_fail as Airflow's
sensors have them, on_kill, lineage. Nothing sleeps or touches the network.
"""

from __future__ import annotations

import json
import time
from typing import Any
from unittest import mock

import pytest
from factories import api_prediction

from airflow_provider_kontext.compat import (
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)
from airflow_provider_kontext.edits.events import prediction_event, timeout_event
from airflow_provider_kontext.exceptions import (
    FluxKontextNotFoundError,
    FluxKontextPredictionFailed,
    FluxKontextPredictionFailedNoRetry,
    FluxKontextServerError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.sensors.kontext import FluxKontextPredictionSensor
from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

PID = "sensor0prediction0id0abc"
OUT_URL = "https://replicate.delivery/xezq/out.png"
INPUT_URL = "https://images.example.com/shots/mug.png?X-Signature=secret123"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


def make_prediction(status: str, **fields: Any) -> Prediction:
    return api_prediction(
        PID, status, **{"input": {"prompt": "Make it blue", "input_image": INPUT_URL}, **fields}
    )


def succeeded(**fields: Any) -> Prediction:
    return make_prediction(
        "succeeded",
        output=OUT_URL,
        completed_at="2025-05-01T10:00:06+00:00",
        metrics={"predict_time": 4.2},
        **fields,
    )


@pytest.fixture
def hook():
    fake = mock.create_autospec(FluxKontextHook, instance=True)
    fake.redact.side_effect = lambda text: text
    fake.uploaded_file_id.return_value = None  # inputs are plain URLs unless a test says otherwise
    fake.get_prediction.return_value = succeeded(logs="Using seed: 1234\n")
    with mock.patch.object(FluxKontextPredictionSensor, "hook", fake):
        yield fake


@pytest.fixture
def no_sleep():
    with mock.patch("airflow.sdk.bases.sensor.time.sleep") as sleep:
        yield sleep


def make_sensor(**kwargs: Any) -> FluxKontextPredictionSensor:
    kwargs.setdefault("task_id", "wait")
    kwargs.setdefault("prediction_id", PID)
    sensor = FluxKontextPredictionSensor(**kwargs)
    sensor._cached_logger = mock.Mock(name="log")
    return sensor


def make_context() -> dict[str, Any]:
    return {"ti": mock.MagicMock(name="ti")}


def pushed(context: dict[str, Any]) -> dict[str, Any]:
    return {c.kwargs["key"]: c.kwargs["value"] for c in context["ti"].xcom_push.call_args_list}


# --- arguments ------------------------------------------------------------------------------------


def test_template_fields_and_defaults():
    sensor = make_sensor()
    assert set(FluxKontextPredictionSensor.template_fields) == {"prediction_id", "output_path"}
    assert sensor.cancel_on_kill is False  # someone else's prediction
    assert sensor.poke_interval == 2.0
    assert sensor.hook_params == {}


@pytest.mark.parametrize(("setting", "expected"), [("True", True), ("False", False)])
def test_deferrable_follows_airflows_default_deferrable(monkeypatch, setting, expected):
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", setting)
    assert make_sensor().deferrable is expected
    assert make_sensor(deferrable=not expected).deferrable is (not expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hook_params": {"timeout": 0}}, "timeout"),
        ({"hook_params": {"retries": 3}}, "retries"),
        ({"hook_params": ["timeout"]}, "hook_params"),
        ({"poke_interval": 0}, "poke_interval"),
        ({"max_output_bytes": 0}, "max_output_bytes"),
        ({"flux_kontext_conn_id": ""}, "flux_kontext_conn_id"),
    ],
)
def test_bad_arguments_rejected_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_sensor(**kwargs)


@pytest.mark.parametrize("rendered", ["", "  ", "None", None])
def test_a_missing_prediction_id_fails_without_retry(hook, rendered):
    with pytest.raises(AirflowFailException, match="prediction_id"):
        make_sensor(prediction_id=rendered, deferrable=True).execute(make_context())
    hook.get_prediction.assert_not_called()


# --- deferrable ------------------------------------------------------------------------------------


def test_polls_once_then_defers_with_the_trigger(hook):
    hook.get_prediction.return_value = make_prediction("processing", created_at="2025-05-01T10:00:01+00:00")
    sensor = make_sensor(
        deferrable=True,
        flux_kontext_conn_id="kontext_prod",
        poke_interval=4,
        timeout=600,
        hook_params={"timeout": 12, "max_retries": 2},
    )
    context = make_context()
    before = time.time()
    with pytest.raises(TaskDeferred) as info:
        sensor.execute(context)
    deferred = info.value
    assert isinstance(deferred.trigger, FluxKontextPredictionTrigger)
    assert deferred.method_name == "execute_complete"
    _, kwargs = deferred.trigger.serialize()
    assert kwargs["prediction_id"] == PID
    assert kwargs["flux_kontext_conn_id"] == "kontext_prod"
    assert kwargs["poll_interval"] == 4.0
    assert kwargs["cancel_on_kill"] is False
    assert kwargs["hook_params"] == {"timeout": 12, "max_retries": 2}
    # The shared watcher's window starts at the prediction's creation, learnt on the first poll.
    assert kwargs["created_at"] == "2025-05-01T10:00:01+00:00"
    assert before + 600 <= kwargs["end_time"] <= time.time() + 600
    assert deferred.timeout.total_seconds() > 600  # Airflow's own timeout is only a backstop
    assert not deferred.kwargs
    assert pushed(context) == {"prediction_web_url": f"https://replicate.com/p/{PID}"}
    hook.get_prediction.assert_called_once_with(PID, retry_limits=mock.ANY)


def test_a_finished_prediction_completes_without_deferring(hook):
    hook.get_prediction.return_value = succeeded()
    context = make_context()
    assert make_sensor(deferrable=True).execute(context) == [OUT_URL]
    summary = pushed(context)["prediction"]
    assert (summary["id"], summary["status"], summary["predict_time"]) == (PID, "succeeded", 4.2)
    assert summary["outputs"] == [OUT_URL]


def test_complete_returns_what_the_operator_returns(hook, tmp_path):
    hook.download.side_effect = lambda url, dest, max_bytes: dest.write(PNG) and "image/png"
    context = make_context()
    sensor = make_sensor(deferrable=True, output_path=str(tmp_path))
    result = sensor.execute_complete(context, prediction_event(succeeded()).payload())
    (saved,) = tmp_path.glob("*.png")
    assert saved.name == f"mug-{PID}.png"  # named after the prediction's own input, as the operator does
    assert result == [saved.as_uri()]
    assert saved.read_bytes() == PNG
    summary = pushed(context)["prediction"]
    assert summary["outputs"] == result
    assert summary["input_image"] == "https://images.example.com/shots/mug.png"  # no signature
    assert summary["input_name"] == "mug.png"
    assert context["ti"].xcom_push.call_count == 1


def test_a_seed_the_event_lacks_is_read_once_and_a_failed_read_leaves_none(hook):
    context = make_context()
    make_sensor(deferrable=True).execute_complete(context, prediction_event(succeeded()).payload())
    assert pushed(context)["prediction"]["seed"] == 1234
    hook.get_prediction.assert_called_once_with(PID)
    hook.get_prediction.reset_mock()
    logged = prediction_event(succeeded(logs="Using seed: 77\n")).payload()
    context = make_context()
    make_sensor(deferrable=True).execute_complete(context, logged)
    assert pushed(context)["prediction"]["seed"] == 77
    hook.get_prediction.assert_not_called()  # the event had it
    hook.get_prediction.side_effect = FluxKontextServerError(status=500)
    context = make_context()
    make_sensor(deferrable=True).execute_complete(context, prediction_event(succeeded()).payload())
    assert pushed(context)["prediction"]["seed"] is None


def test_a_prediction_canceled_at_its_deadline_fails_the_sensor_without_retry(hook):
    """Check that the sensor, which did not start the prediction, takes a deadline's cancel as final."""
    at_deadline = make_prediction(
        "canceled", deadline="2025-05-01T10:05:00+00:00", completed_at="2025-05-01T10:05:00+00:00"
    )
    with pytest.raises(FluxKontextPredictionFailedNoRetry, match="canceled"):
        make_sensor(deferrable=True).execute_complete(make_context(), prediction_event(at_deadline).payload())


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_a_failed_prediction_fails_without_retry_or_is_skipped_with_soft_fail(hook, status):
    event = prediction_event(make_prediction(status, error="NSFW content detected")).payload()
    with pytest.raises(FluxKontextPredictionFailedNoRetry, match="NSFW"):
        make_sensor(deferrable=True).execute_complete(make_context(), event)
    soft = make_sensor(deferrable=True, soft_fail=True)
    with pytest.raises(AirflowSkipException):
        soft.resume_execution("execute_complete", {"event": event}, make_context())
    hook.cancel_prediction.assert_not_called()


def test_timeout_fails_as_a_sensor_timeout_and_leaves_the_prediction_running(hook):
    event = timeout_event(PID, 600.0, "processing").payload()
    with pytest.raises(AirflowSensorTimeout, match="left running"):
        make_sensor(deferrable=True).execute_complete(make_context(), event)
    with pytest.raises(AirflowSkipException):
        make_sensor(deferrable=True, soft_fail=True).resume_execution(
            "execute_complete", {"event": event}, make_context()
        )
    hook.cancel_prediction.assert_not_called()


def test_first_poll_failure_is_skipped_with_soft_fail(hook):
    hook.get_prediction.return_value = make_prediction("failed", error="boom")
    with pytest.raises(AirflowSkipException):
        make_sensor(deferrable=True, soft_fail=True).execute(make_context())


# --- poking in the worker --------------------------------------------------------------------------


def test_pokes_until_the_prediction_succeeds(hook, no_sleep):
    hook.get_prediction.side_effect = [
        make_prediction("starting"),
        make_prediction("processing"),
        succeeded(),
    ]
    context = make_context()
    assert make_sensor(deferrable=False, poke_interval=3).execute(context) == [OUT_URL]
    assert hook.get_prediction.call_count == 3
    assert [c.args[0] for c in no_sleep.call_args_list] == [3.0, 3.0]
    assert pushed(context)["prediction"]["status"] == "succeeded"
    # Each poll retries transient failures within the poller's budget, as the operator's loop does.
    assert all(c.kwargs["retry_limits"].retries == 10 for c in hook.get_prediction.call_args_list)


def test_a_failure_the_hook_could_not_retry_away_ends_the_wait(hook, no_sleep):
    hook.get_prediction.side_effect = [
        make_prediction("processing"),
        FluxKontextServerError("502", status=502),
    ]
    with pytest.raises(FluxKontextPredictionFailed, match="502"):
        make_sensor(deferrable=False).execute(make_context())


def test_an_unknown_prediction_ends_the_wait(hook, no_sleep):
    hook.get_prediction.side_effect = FluxKontextNotFoundError("404 Not Found", status=404)
    with pytest.raises(FluxKontextPredictionFailed, match="404"):
        make_sensor(deferrable=False).execute(make_context())


def test_poking_past_the_timeout_fails_or_skips_and_does_not_cancel(hook, no_sleep):
    hook.get_prediction.return_value = make_prediction("processing")
    with pytest.raises(AirflowSensorTimeout):
        make_sensor(deferrable=False, timeout=0).execute(make_context())
    with pytest.raises(AirflowSkipException):
        make_sensor(deferrable=False, timeout=0, soft_fail=True).execute(make_context())
    hook.cancel_prediction.assert_not_called()


@pytest.mark.parametrize(("cancel_on_kill", "cancels"), [(False, 0), (True, 1)])
def test_on_kill_cancels_only_when_asked(hook, cancel_on_kill, cancels):
    hook.cancel_prediction.return_value = make_prediction("canceled")
    make_sensor(cancel_on_kill=cancel_on_kill).on_kill()
    assert hook.cancel_prediction.call_count == cancels


# --- lineage ---------------------------------------------------------------------------------------


def test_lineage_names_the_input_and_the_outputs(hook):
    hook.get_prediction.return_value = succeeded()
    sensor = make_sensor(deferrable=False)
    sensor.execute(make_context())
    lineage = sensor.get_openlineage_facets_on_complete(mock.Mock())
    assert [(d.namespace, d.name) for d in lineage.inputs] == [
        ("https://images.example.com", "/shots/mug.png")
    ]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("https://replicate.delivery", "/xezq/out.png")
    ]
    facet = lineage.run_facets["fluxKontextPrediction"]
    assert (facet.predictionId, facet.model, facet.predictTime) == (
        PID,
        "black-forest-labs/flux-kontext-dev",
        4.2,
    )


def test_lineage_after_resuming_uses_the_input_location_from_the_event(hook):
    event = prediction_event(succeeded()).payload()
    # The trigger's event names the input without its signature, never a data: URI.
    assert event["input_location"] == "https://images.example.com/shots/mug.png"
    assert "secret123" not in json.dumps(event)
    sensor = make_sensor(deferrable=True)
    sensor.execute_complete(make_context(), event)
    lineage = sensor.get_openlineage_facets_on_complete(mock.Mock())
    assert [d.name for d in lineage.inputs] == ["/shots/mug.png"]


def test_an_inline_input_image_is_no_location():
    inline = succeeded(input={"prompt": "p", "input_image": "data:image/png;base64,iVBORw0KGgo="})
    assert prediction_event(inline).input_location is None


def test_a_files_api_input_is_named_by_its_files_record(hook, tmp_path):
    """An input uploaded with the Files API is named ``mug.png`` (its record), not by its upload id."""
    from airflow_provider_kontext.models import UploadedFile

    file_url = "https://api.replicate.com/v1/files/pu5zcgfileid"
    hook.download.side_effect = lambda url, dest, max_bytes: dest.write(PNG) and "image/png"
    hook.uploaded_file_id.side_effect = lambda url: "pu5zcgfileid" if url == file_url else None
    hook.get_file.return_value = UploadedFile(id="pu5zcgfileid", name="mug.png", urls={"get": file_url})
    context = make_context()
    event = prediction_event(succeeded(input={"prompt": "p", "input_image": file_url})).payload()
    make_sensor(deferrable=True, output_path=str(tmp_path)).execute_complete(context, event)
    hook.get_file.assert_called_once_with("pu5zcgfileid")
    (saved,) = tmp_path.glob("*.png")
    assert saved.name == f"mug-{PID}.png"
    assert pushed(context)["prediction"]["input_name"] == "mug.png"
    assert pushed(context)["prediction"]["input_image"] == file_url


def test_an_unreadable_files_record_keeps_the_upload_id(hook):
    file_url = "https://api.replicate.com/v1/files/pu5zcgfileid"
    hook.uploaded_file_id.return_value = "pu5zcgfileid"
    hook.get_file.side_effect = FluxKontextNotFoundError("File not found")
    context = make_context()
    event = prediction_event(succeeded(input={"prompt": "p", "input_image": file_url})).payload()
    make_sensor(deferrable=True).execute_complete(context, event)
    assert pushed(context)["prediction"]["input_name"] == "pu5zcgfileid"


def test_the_hook_reads_a_files_record_and_knows_its_own_files(monkeypatch, requests_mock):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT",
        json.dumps({"conn_type": "fluxkontext", "host": "https://proxy.example/replicate"}),
    )
    real = FluxKontextHook()
    base = "https://proxy.example/replicate/v1/files/"
    assert real.uploaded_file_id(base + "abc_1") == "abc_1"
    assert real.uploaded_file_id(base + "abc_1/download?sig=x") is None
    assert real.uploaded_file_id(base + "../predictions") is None
    assert real.uploaded_file_id("https://other.example/v1/files/abc") is None
    assert real.uploaded_file_id(None) is None
    requests_mock.get(
        base + "abc_1", json={"id": "abc_1", "name": "mug.png", "urls": {"get": base + "abc_1"}}
    )
    assert real.get_file("abc_1").name == "mug.png"
    with pytest.raises(ValueError, match="not a file id"):
        real.get_file("../x")
