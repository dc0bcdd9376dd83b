"""``FluxKontextEditOperator`` with the hook replaced by a mock: validation before any HTTP call, the
create request, deferral, reattach on retry, completion, downloads, in-worker polling, on_kill,
mapping and the extra link. Nothing sleeps or touches the network."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pendulum
import pytest
from airflow.sdk import DAG, Asset, ObjectStoragePath
from airflow.sdk.execution_time.context import OutletEventAccessors
from factories import api_prediction

from airflow_provider_kontext.compat import AirflowFailException, TaskDeferred
from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextInputError,
    FluxKontextNotFoundError,
    FluxKontextPredictionFailed,
    FluxKontextPredictionMayExistError,
    FluxKontextServerError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.links.kontext import FluxKontextPredictionLink
from airflow_provider_kontext.models import Prediction, UploadedFile
from airflow_provider_kontext.operators.kontext import (
    FluxKontextEditOperator,
    FluxKontextPredictionFailedNoRetry,
)
from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

PID = "gm3qorzdhgbfurvjtvhg6dckhu"
OLD_PID = "old0prediction0from0try1"
NEW_PID = "new0prediction0from0try2"
IMAGE_URL = "https://example.com/cat.png"
OUT_URL = "https://replicate.delivery/xezq/server-chosen-name.webp"
PROMPT = "Make it a snowy winter scene"
TOKEN = "r8_OperatorTestToken_9d2b4f61"  # recognisable, so a leak is easy to find
STATE_KEY = FluxKontextEditOperator.STATE_KEY
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64)


# --- helpers ---------------------------------------------------------------------------------------


SECRET_ECHO = "r8_ECHOED_BY_A_PROXY"


def make_prediction(status: str, prediction_id: str | None = PID, **fields: Any) -> Prediction:
    return api_prediction(prediction_id, status, **fields)


def succeeded(prediction_id: str | None = PID, output: Any = OUT_URL, **fields: Any) -> Prediction:
    return make_prediction(
        "succeeded",
        prediction_id,
        output=output,
        completed_at="2025-05-01T10:00:06+00:00",
        metrics={"predict_time": 4.2},
        **fields,
    )


class FakeStore:
    """The task state store's get/set/delete over a dict (survives "retries" within a test)."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = dict(data or {})
        self.calls: list[tuple[str, str]] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.calls.append(("get", key))
        return self.data.get(key, default)

    def set(self, key: str, value: Any, *, retention: timedelta | None = None) -> None:
        assert value is not None
        json.dumps(value)  # the real store accepts JSON values only
        self.calls.append(("set", key))
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.data.pop(key, None)


def make_context(
    store: Any = "new", outlet_events: Any = None, *, try_number: int = 1, max_tries: int = 0
) -> dict[str, Any]:
    """A fake context; ``store=None`` leaves the task state store out (Airflow < 3.3)."""
    ti = mock.MagicMock(name="ti", try_number=try_number, max_tries=max_tries)
    dag_run = mock.MagicMock(name="dag_run", clear_number=0, start_date=None)
    context: dict[str, Any] = {"ti": ti, "dag_run": dag_run}
    if store is not None:
        context["task_state_store"] = FakeStore() if store == "new" else store
    if outlet_events is not None:
        context["outlet_events"] = outlet_events
    return context


def pushed(context: dict[str, Any]) -> dict[str, Any]:
    return {c.kwargs["key"]: c.kwargs["value"] for c in context["ti"].xcom_push.call_args_list}


def make_op(**kwargs: Any) -> FluxKontextEditOperator:
    kwargs.setdefault("task_id", "edit")
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("input_image", IMAGE_URL)
    op = FluxKontextEditOperator(**kwargs)
    op._cached_logger = mock.Mock(name="log")  # where the Task SDK operator caches its logger
    return op


def logged(op: FluxKontextEditOperator, level: str = "info") -> list[str]:
    return [c.args[0] % c.args[1:] for c in getattr(op._cached_logger, level).call_args_list]


def sent_input(hook: mock.Mock) -> dict[str, Any]:
    hook.create_prediction.assert_called_once()
    return hook.create_prediction.call_args.args[1]


@pytest.fixture
def hook():
    """A spec'd mock replacing the operator's ``hook`` cached_property for every instance."""
    fake = mock.create_autospec(FluxKontextHook, instance=True)
    fake.create_prediction.return_value = make_prediction("starting")
    fake.redact.side_effect = lambda text: text.replace(SECRET_ECHO, "***")
    with mock.patch.object(FluxKontextEditOperator, "hook", fake):
        yield fake


@pytest.fixture
def no_sleep():
    with mock.patch("airflow_provider_kontext.operators.kontext.time.sleep") as sleep:
        yield sleep


def run_deferring(op: FluxKontextEditOperator, context: dict[str, Any]) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as info:
        op.execute(context)
    return info.value


# --- validation before any HTTP call ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"aspect_ratio": "2:1"}, "aspect_ratio"),  # pro/max only, not dev
        ({"output_format": "gif"}, "output_format"),
        ({"num_inference_steps": 60}, "num_inference_steps"),
        ({"guidance": "10.5"}, "guidance"),
        ({"output_quality": -1}, "output_quality"),
        ({"extra_input": {"safety_tolerance": 2}}, "safety_tolerance"),
        ({"extra_input": {"seed": 1}, "seed": 2}, "seed"),
        ({"extra_input": {"input_image": "https://x/y.png"}}, "input_image"),
        ({"extra_input": {"prompt": "other"}}, "prompt"),
        ({"extra_input": ["not", "a", "dict"]}, "extra_input"),
        ({"prompt": "   "}, "prompt"),
        ({"input_image": "ftp://example.com/cat.png"}, "input_image"),
    ],
)
def test_invalid_input_fails_before_any_call(hook, kwargs, field):
    op = make_op()
    for name, value in kwargs.items():  # as a template may render them
        setattr(op, name, value)
    with pytest.raises(AirflowFailException, match=field):
        op.execute(make_context())
    assert hook.method_calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance": 42}, "guidance: Input should be less than or equal to 10 (got 42)"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio: Input should be 'match_input_image', '1:1'"),
        ({"output_format": "gif"}, "output_format: Input should be 'webp', 'jpg' or 'png'"),
        ({"num_inference_steps": "60"}, "num_inference_steps: Input should be less than or equal to 50"),
        ({"output_quality": -1}, "output_quality: Input should be greater than or equal to 0"),
        ({"prompt": "   "}, "prompt: must not be blank"),
        ({"extra_input": {"safety_tolerance": 2}}, "safety_tolerance: unknown input"),
        ({"input_image": "https://"}, "input_image: must be an http(s) URL with a host name"),
        ({"model": "no/such model"}, "model: must be 'owner/name'"),
        (
            {"model": "black-forest-labs/flux-kontext-pro", "extra_input": {"safety_tolerance": 9}},
            "safety_tolerance: Input should be less than or equal to 6 (got 9)",
        ),
    ],
)
def test_a_bad_literal_input_is_a_dag_import_error(kwargs, message):
    """Checked in ``__init__``: the DAG file fails to import, naming the task, field and range."""
    with pytest.raises(FluxKontextInputError) as info:
        make_op(**kwargs)
    assert str(info.value).startswith("Task 'edit': ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance": "{{ params.guidance }}"},
        {"num_inference_steps": "{% if true %}60{% endif %}"},
        {"prompt": "{{ params.prompt }}"},
        {"extra_input": {"seed": "{{ params.seed }}"}},
        {"input_image": "{{ ti.xcom_pull('list') }}"},
        {"model": "{{ params.model }}", "guidance": 42},  # which schema applies is known at run time
        {"input_image": "/no/such/file.png"},  # read at run time, never when parsing
    ],
)
def test_templated_inputs_are_left_for_run_time(kwargs):
    make_op(**kwargs)


def test_an_xcom_reference_is_left_for_run_time():
    with DAG("kontext_xcom_input", schedule=None, start_date=pendulum.datetime(2025, 1, 1)):
        from airflow.sdk import task

        @task
        def steps() -> int:
            return 99

        make_op(num_inference_steps=steps())


def test_extra_input_clash_names_the_argument(hook):
    op = make_op(seed=2, extra_input={"seed": 1, "go_fast": True})
    with pytest.raises(AirflowFailException, match=r"repeats arguments given directly: seed$"):
        op.execute(make_context())


def test_unreadable_local_path(hook, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(AirflowFailException, match="input_image: cannot read") as info:
        make_op(input_image=str(missing)).execute(make_context())
    assert "missing.png" in str(info.value)
    assert hook.method_calls == []


def test_directory_is_unreadable(hook, tmp_path):
    with pytest.raises(AirflowFailException, match="input_image"):
        make_op(input_image=str(tmp_path)).execute(make_context())
    assert hook.method_calls == []


def test_local_file_that_is_not_an_image(hook, tmp_path):
    text = tmp_path / "notes.png"  # the name claims png; the bytes decide
    text.write_text("just some text, not an image\n")
    with pytest.raises(AirflowFailException, match=re.escape("input_image: 'notes.png' is not a jpeg")):
        make_op(input_image=text).execute(make_context())
    assert hook.method_calls == []


def test_bytes_that_are_not_an_image(hook):
    with pytest.raises(AirflowFailException, match="input_image"):
        make_op(input_image=b"<html>oops</html>").execute(make_context())
    assert hook.method_calls == []


def test_validation_failure_is_not_retried(hook):
    # AirflowFailException (not a plain error) tells Airflow not to retry a bad input.
    op = make_op(num_inference_steps="{{ params.steps }}")
    op.num_inference_steps = "3"  # as rendered
    with pytest.raises(AirflowFailException) as info:
        op.execute(make_context())
    assert type(info.value) is AirflowFailException


@pytest.mark.parametrize(
    "kwargs",
    [{"wait_seconds": 0}, {"wait_seconds": 61}, {"poll_interval": 0}, {"timeout": -1}],
)
def test_bad_operator_arguments_rejected_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_op(**kwargs)


# --- the create request ----------------------------------------------------------------------------


def test_templated_strings_are_converted(hook):
    op = make_op(
        num_inference_steps="28",
        guidance="3.5",
        seed="42",
        output_quality="90",
        disable_safety_checker="false",
        go_fast="true",
    )
    run_deferring(op, make_context())
    model_input = sent_input(hook)
    assert model_input["num_inference_steps"] == 28
    assert model_input["guidance"] == 3.5
    assert model_input["seed"] == 42
    assert model_input["output_quality"] == 90
    assert model_input["disable_safety_checker"] is False
    assert model_input["go_fast"] is True


def test_every_model_argument_is_sent(hook):
    op = make_op(
        aspect_ratio="16:9",
        num_inference_steps=30,
        guidance=4,
        seed=7,
        output_format="png",
        output_quality=95,
        disable_safety_checker=True,
        go_fast=False,
    )
    run_deferring(op, make_context())
    assert sent_input(hook) == {
        "prompt": PROMPT,
        "input_image": IMAGE_URL,
        "aspect_ratio": "16:9",
        "num_inference_steps": 30,
        "guidance": 4.0,
        "seed": 7,
        "output_format": "png",
        "output_quality": 95,
        "disable_safety_checker": True,
        "go_fast": False,
    }
    assert hook.create_prediction.call_args.args[0] == "black-forest-labs/flux-kontext-dev"


def test_unset_arguments_are_not_sent(hook):
    run_deferring(make_op(), make_context())
    assert sent_input(hook) == {"prompt": PROMPT, "input_image": IMAGE_URL}


def test_extra_input_for_another_model(hook):
    op = make_op(model="black-forest-labs/flux-kontext-pro", extra_input={"safety_tolerance": 1})
    run_deferring(op, make_context())
    assert hook.create_prediction.call_args.args[0] == "black-forest-labs/flux-kontext-pro"
    assert sent_input(hook)["safety_tolerance"] == 1


def test_data_uri_input_passed_on(hook):
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    run_deferring(make_op(input_image=uri), make_context())
    assert sent_input(hook)["input_image"] == uri
    hook.upload_file.assert_not_called()


@pytest.mark.parametrize("form", ["bytes", "str", "path", "file_url", "object_storage"])
def test_small_local_image_sent_inline(hook, tmp_path, form):
    image = tmp_path / "photo.png"
    image.write_bytes(PNG)
    value = {
        "bytes": PNG,
        "str": str(image),
        "path": image,
        "file_url": image.as_uri(),
        "object_storage": ObjectStoragePath(image.as_uri()),
    }[form]
    run_deferring(make_op(input_image=value), make_context())
    assert sent_input(hook)["input_image"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    hook.upload_file.assert_not_called()


def test_remote_object_storage_image_read_through_its_filesystem(hook):
    import fsspec
    from airflow.sdk.io import attach

    # Airflow 3.1 registers no filesystem for memory://; attaching one works on every version.
    attach("memory", fs=fsspec.filesystem("memory"))
    image = ObjectStoragePath("memory://kontext-operator-test/in/photo.png")
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(PNG)
    try:
        run_deferring(make_op(input_image=image), make_context())
    finally:
        image.unlink()
    assert sent_input(hook)["input_image"] == "data:image/png;base64," + base64.b64encode(PNG).decode()


def test_large_local_image_uploaded(hook, tmp_path):
    image = tmp_path / "big.jpg"
    image.write_bytes(JPEG + bytes(2000))
    file_url = "https://api.replicate.com/v1/files/f1/download"
    hook.upload_file.return_value = UploadedFile.model_validate({"id": "f1", "urls": {"get": file_url}})
    run_deferring(make_op(input_image=str(image), inline_image_max_bytes=1000), make_context())
    hook.upload_file.assert_called_once_with(
        image.read_bytes(), filename="big.jpg", content_type="image/jpeg"
    )
    assert sent_input(hook)["input_image"] == file_url


def test_image_at_the_inline_limit_is_inline(hook):
    run_deferring(make_op(input_image=PNG, inline_image_max_bytes=len(PNG)), make_context())
    assert sent_input(hook)["input_image"].startswith("data:image/png;base64,")
    hook.upload_file.assert_not_called()


def test_uploaded_bytes_get_a_file_name_with_extension(hook):
    hook.upload_file.return_value = UploadedFile.model_validate({"id": "f1", "urls": {"get": "https://f/1"}})
    run_deferring(make_op(input_image=JPEG, inline_image_max_bytes=10), make_context())
    assert hook.upload_file.call_args.kwargs == {"filename": "input.jpg", "content_type": "image/jpeg"}


# --- Cancel-After / timeout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"timeout": 90}, 90.0),
        ({"timeout": timedelta(minutes=2)}, 120.0),
        ({"timeout": 45, "execution_timeout": timedelta(hours=1)}, 45.0),  # explicit timeout wins
        ({"execution_timeout": timedelta(minutes=10)}, 540.0),  # less a 60 s margin
        ({"execution_timeout": timedelta(seconds=100)}, 90.0),  # less 10 %
        ({"execution_timeout": timedelta(seconds=10)}, 9.0),
        ({}, 1800.0),  # Replicate's own 30-minute limit
    ],
    ids=["seconds", "timedelta", "explicit-wins", "exec-10m", "exec-100s", "exec-10s", "default"],
)
def test_cancel_after(hook, kwargs, expected):
    run_deferring(make_op(**kwargs), make_context())
    assert hook.create_prediction.call_args.kwargs["cancel_after"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "seconds"),
    [({"timeout": 300}, 300.0), ({"execution_timeout": timedelta(minutes=10)}, 540.0), ({}, 1800.0)],
)
def test_a_throttled_create_may_wait_until_the_edits_deadline(hook, kwargs, seconds):
    """The create's deadline (tests/test_create_throttling.py): the edit's timeout from the try's start."""
    before = time.time()
    run_deferring(make_op(**kwargs), make_context())
    deadline = hook.create_prediction.call_args.kwargs["deadline"]
    assert before + seconds <= deadline <= time.time() + seconds


def test_wait_seconds_forwarded_and_finished_prediction_completes_without_deferring(hook):
    hook.create_prediction.return_value = succeeded()
    context = make_context()
    result = make_op(wait_seconds=30).execute(context)
    assert result == [OUT_URL]
    assert hook.create_prediction.call_args.kwargs["wait"] == 30
    hook.get_prediction.assert_not_called()
    assert pushed(context)["prediction"]["id"] == PID


def test_no_wait_by_default(hook):
    run_deferring(make_op(), make_context())
    assert hook.create_prediction.call_args.kwargs["wait"] is None


def test_proxy_images_api_answer_completes(hook):
    """A proxy answering ``{"created", "data": [{"url"}]}``: finished, without an id."""
    hook.create_prediction.return_value = Prediction.model_validate(
        {"created": 1_746_093_600, "data": [{"url": OUT_URL}]}
    )
    context = make_context()
    assert make_op().execute(context) == [OUT_URL]
    assert context["task_state_store"].data == {}


# --- deferral --------------------------------------------------------------------------------------


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


# --- reattach on retry -----------------------------------------------------------------------------


@pytest.fixture
def first_try(hook):
    """Run try 1 up to its deferral; return the store it left (XComs do not survive, the store does)."""
    hook.create_prediction.return_value = make_prediction("processing", OLD_PID)
    store = FakeStore()
    run_deferring(make_op(), make_context(store))
    assert store.data[STATE_KEY]["id"] == OLD_PID
    hook.reset_mock(return_value=True, side_effect=True)
    hook.create_prediction.return_value = make_prediction("starting", NEW_PID)
    hook.redact.side_effect = lambda text: text.replace(SECRET_ECHO, "***")
    return store


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


# --- uncertain create ------------------------------------------------------------------------------


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


# --- execute_complete ------------------------------------------------------------------------------


def stored_context() -> dict[str, Any]:
    return make_context(FakeStore({STATE_KEY: {"id": PID, "fingerprint": "f"}, "other": 1}))


def test_complete_succeeded(hook):
    context = stored_context()
    event = prediction_event(succeeded(output=[OUT_URL, "https://replicate.delivery/b.webp"]))
    result = make_op().execute_complete(context, event)
    assert result == [OUT_URL, "https://replicate.delivery/b.webp"]
    summary = pushed(context)["prediction"]
    assert summary["id"] == PID
    assert summary["status"] == "succeeded"
    assert summary["model"] == "black-forest-labs/flux-kontext-dev"
    assert summary["predict_time"] == 4.2
    assert summary["web_url"] == f"https://replicate.com/p/{PID}"
    assert summary["completed_at"] == "2025-05-01T10:00:06+00:00"
    assert summary["urls_expire_at"] == "2025-05-01T11:00:06+00:00"
    assert summary["outputs"] == result
    assert summary["input_image"] == IMAGE_URL
    assert summary["input_name"] == "cat.png"
    assert summary["prompt"] == PROMPT
    json.dumps(summary)
    entry = context["task_state_store"].data[STATE_KEY]  # kept, marked finished by this try
    assert entry["finished"] == {"try_number": 1, "max_tries": 0, "clear_number": 0}
    assert context["task_state_store"].data["other"] == 1
    hook.cancel_prediction.assert_not_called()


def test_resuming_logs_one_summary_line(hook, tmp_path):
    hook.download.side_effect = writes(PNG)
    op = make_op(output_path=str(tmp_path))
    op.execute_complete(stored_context(), prediction_event(succeeded()))
    saved = (tmp_path / f"cat-{PID}.png").as_uri()
    assert logged(op)[-1] == f"Prediction {PID} succeeded in 4.2s from cat.png: 1 output saved to {saved}"


@pytest.mark.parametrize(
    ("image", "where"),
    [
        ("data:image/png;base64," + base64.b64encode(PNG).decode(), "data:image/png,..."),
        ("https://bucket.example/in/cat.png?X-Amz-Signature=s3cr3t#x", "https://bucket.example/in/cat.png"),
        (PNG, None),
    ],
)
def test_the_summary_never_carries_an_image_blob_or_a_signature(hook, image, where):
    op = make_op()
    op.input_image = image
    context = stored_context()
    op.execute_complete(context, prediction_event(succeeded()))
    summary = pushed(context)["prediction"]
    assert summary["input_image"] == where
    assert "s3cr3t" not in json.dumps(summary)
    assert base64.b64encode(PNG).decode()[:20] not in json.dumps(summary)


def test_the_summary_names_the_requested_model(hook):
    context = stored_context()
    model = "black-forest-labs/flux-kontext-dev:" + "a" * 64
    make_op(model=model).execute_complete(context, prediction_event(succeeded()))
    assert pushed(context)["prediction"]["model"] == model


@pytest.mark.parametrize("status", ["failed", "canceled", "aborted"])
def test_complete_unsuccessful(hook, status):
    prediction = make_prediction(
        status, error="NSFW content detected", logs="step 1/28\nstep 2/28\nrunning safety checker\n"
    )
    context = stored_context()
    with pytest.raises(FluxKontextPredictionFailed) as info:
        make_op().execute_complete(context, prediction_event(prediction))
    exc = info.value
    assert exc.status == status
    assert exc.prediction_id == PID
    assert exc.error == "NSFW content detected"
    assert exc.logs_tail == "step 1/28\nstep 2/28\nrunning safety checker"
    message = str(exc)
    assert f"Prediction {PID} {status}: NSFW content detected" in message
    assert "running safety checker" in message
    assert "prediction" not in pushed(context)
    hook.cancel_prediction.assert_not_called()


def test_complete_succeeded_without_output(hook):
    with pytest.raises(FluxKontextPredictionFailed, match="returned no output") as info:
        make_op().execute_complete(stored_context(), prediction_event(succeeded(output=[])))
    assert info.value.status == "succeeded"


def test_complete_succeeded_but_data_removed(hook):
    event = prediction_event(succeeded(output=None, data_removed=True))
    with pytest.raises(FluxKontextPredictionFailed, match="already deleted"):
        make_op().execute_complete(stored_context(), event)


def test_complete_timeout_cancels_then_fails(hook):
    hook.cancel_prediction.return_value = make_prediction("canceled")
    event = {"status": "timeout", "prediction_id": PID, "message": f"Prediction {PID} did not finish"}
    op = make_op()
    with pytest.raises(FluxKontextPredictionFailed, match="did not finish") as info:
        op.execute_complete(make_context(), event)
    hook.cancel_prediction.assert_called_once_with(PID)
    assert info.value.status == "timeout"
    assert info.value.prediction_id == PID


def test_complete_timeout_fails_even_if_cancel_fails(hook):
    hook.cancel_prediction.side_effect = FluxKontextServerError(status=500)
    op = make_op()
    with pytest.raises(FluxKontextPredictionFailed) as info:
        op.execute_complete(make_context(), {"status": "timeout", "prediction_id": PID, "message": "late"})
    assert info.value.status == "timeout"
    assert any("Could not cancel" in line for line in logged(op, "warning"))


def test_complete_error_event(hook):
    event = {"status": "error", "prediction_id": PID, "message": "Polling failed: HTTP 401"}
    with pytest.raises(FluxKontextPredictionFailed, match="HTTP 401") as info:
        make_op().execute_complete(make_context(), event)
    assert info.value.status == "error"
    hook.cancel_prediction.assert_not_called()


def test_asset_outlet_gets_its_event_extra(hook):
    asset = Asset("file:///data/edited")
    op = make_op(outlets=[asset])
    events = OutletEventAccessors()
    context = make_context(outlet_events=events)
    op.execute_complete(context, prediction_event(succeeded()))
    assert events[asset].extra == {
        "prediction_id": PID,
        "outputs": [OUT_URL],
        "input_image": IMAGE_URL,
        "prompt": PROMPT,
        "model": "black-forest-labs/flux-kontext-dev",
    }


def test_asset_outlet_carries_the_saved_paths(hook, tmp_path):
    asset = Asset("file:///data/edited")
    hook.download.side_effect = writes(PNG)
    events = OutletEventAccessors()
    op = make_op(outlets=[asset], output_path=str(tmp_path))
    result = op.execute_complete(make_context(outlet_events=events), prediction_event(succeeded()))
    assert events[asset].extra["outputs"] == result
    assert result == [(tmp_path / f"cat-{PID}.png").as_uri()]


# --- output_path -----------------------------------------------------------------------------------


def writes(*payloads: bytes):
    """A ``hook.download`` side effect writing each payload into the file object it is given."""
    queue = list(payloads)

    def download(url: str, dest: Any, *, max_bytes: int) -> str:
        dest.write(queue.pop(0))
        return "image/webp"  # what the server claims; the bytes decide

    return download


def test_output_path_downloads_and_returns_paths(hook, tmp_path):
    folder = tmp_path / "out"
    second = "https://replicate.delivery/xezq/other.webp"
    hook.download.side_effect = writes(PNG, JPEG)
    context = make_context()
    op = make_op(output_path=str(folder), max_output_bytes=1234)
    result = op.execute_complete(context, prediction_event(succeeded(output=[OUT_URL, second])))
    assert sorted(p.name for p in folder.iterdir()) == [f"cat-{PID}-0.png", f"cat-{PID}-1.jpg"]
    assert (folder / f"cat-{PID}-0.png").read_bytes() == PNG
    assert (folder / f"cat-{PID}-1.jpg").read_bytes() == JPEG
    assert result == [(folder / f"cat-{PID}-0.png").as_uri(), (folder / f"cat-{PID}-1.jpg").as_uri()]
    assert [c.args[0] for c in hook.download.call_args_list] == [OUT_URL, second]
    assert all(c.kwargs["max_bytes"] == 1234 for c in hook.download.call_args_list)
    summary = pushed(context)["prediction"]
    assert summary["outputs"] == result
    assert summary["output_urls"] == [OUT_URL, second]


def test_output_appears_under_its_final_name_only_when_complete(hook, tmp_path):
    """Written to a temporary name and renamed: a reader never sees a half-written final file."""
    folder = tmp_path / "out"
    hook.download.side_effect = writes(PNG)
    renames: list[tuple[str, str, bool]] = []
    original = ObjectStoragePath.rename

    def spy(self: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        renames.append((self.name, ObjectStoragePath(target).name, ObjectStoragePath(target).exists()))
        return original(self, target, *args, **kwargs)

    with mock.patch.object(ObjectStoragePath, "rename", spy):
        make_op(output_path=str(folder)).execute_complete(make_context(), prediction_event(succeeded()))
    assert renames == [(f".cat-{PID}.png.partial", f"cat-{PID}.png", False)]
    assert [p.name for p in folder.iterdir()] == [f"cat-{PID}.png"]


def test_output_path_as_object_storage_path(hook, tmp_path):
    hook.download.side_effect = writes(PNG)
    folder = ObjectStoragePath((tmp_path / "nested" / "dir").as_uri())
    result = make_op(output_path=folder).execute_complete(make_context(), prediction_event(succeeded()))
    assert result == [str(folder / f"cat-{PID}.png")]
    assert (tmp_path / "nested" / "dir" / f"cat-{PID}.png").read_bytes() == PNG


def test_non_image_download_fails_and_leaves_no_file(hook, tmp_path):
    folder = tmp_path / "out"
    hook.download.side_effect = writes(b"<html><body>Access denied</body></html>")
    context = stored_context()
    with pytest.raises(FluxKontextPredictionFailed, match="not a jpeg/png/gif/webp"):
        make_op(output_path=str(folder)).execute_complete(context, prediction_event(succeeded()))
    assert list(folder.iterdir()) == []
    # Still stored, so a retry can reattach and download again while the files exist.
    assert STATE_KEY in context["task_state_store"].data


def test_data_uri_outputs_are_decoded(hook, tmp_path):
    folder = tmp_path / "out"
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    result = make_op(output_path=str(folder)).execute_complete(
        make_context(), prediction_event(succeeded(output=[uri]))
    )
    hook.download.assert_not_called()
    assert (folder / f"cat-{PID}.png").read_bytes() == PNG
    assert result == [(folder / f"cat-{PID}.png").as_uri()]


def test_malformed_data_uri_output_fails_the_task_clearly(hook, tmp_path):
    event = prediction_event(succeeded(output=["data:image/png;base64,@@not-base64@@"]))
    with pytest.raises(FluxKontextPredictionFailed, match=r"output 0.*malformed"):
        make_op(output_path=str(tmp_path / "out")).execute_complete(make_context(), event)


def test_failed_write_leaves_no_partial_file(hook, tmp_path, monkeypatch):
    from airflow.sdk import ObjectStoragePath

    folder = tmp_path / "out"
    hook.download.side_effect = writes(PNG)

    def broken_rename(self, target):
        raise OSError("disk full")

    monkeypatch.setattr(ObjectStoragePath, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        make_op(output_path=str(folder)).execute_complete(make_context(), prediction_event(succeeded()))
    assert list(folder.iterdir()) == []


def test_server_chosen_id_cannot_leave_the_folder(hook, tmp_path):
    folder = tmp_path / "a" / "out"
    hook.download.side_effect = writes(PNG)
    event = prediction_event(succeeded(prediction_id="/../../escaped"))
    make_op(output_path=str(folder)).execute_complete(make_context(), event)
    saved = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.parent for p in saved] == [folder]
    assert saved[0].name == "cat-_______escaped.png"


def test_output_without_prediction_id_is_named_after_the_input(hook, tmp_path):
    folder = tmp_path / "out"
    hook.download.side_effect = writes(PNG)
    make_op(output_path=str(folder)).execute_complete(
        make_context(), prediction_event(succeeded(prediction_id=None))
    )
    assert [p.name for p in folder.iterdir()] == ["cat.png"]


def test_output_without_input_name_or_prediction_id_gets_a_generated_name(hook, tmp_path):
    folder = tmp_path / "out"
    hook.download.side_effect = writes(PNG)
    make_op(input_image=PNG, output_path=str(folder)).execute_complete(
        make_context(), prediction_event(succeeded(prediction_id=None))
    )
    [saved] = list(folder.iterdir())
    assert re.fullmatch(r"edit-\d+\.png", saved.name)


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("/data/shots/mug.png", "mug-{pid}.png"),
        ("file:///data/shots/Red Mug (v2).final.JPG", "Red_Mug__v2__final-{pid}.png"),
        ("https://cdn.example/a/b/mug%20blue.webp?X-Amz-Signature=s3cr3t", "mug_blue-{pid}.png"),
        ("data:image/png;base64,iVBORw0KGgo=", "{pid}.png"),
        ("https://cdn.example/", "cdn-{pid}.png"),
    ],
)
def test_outputs_are_named_after_their_input(hook, tmp_path, image, name):
    folder = tmp_path / "out"
    hook.download.side_effect = writes(PNG)
    op = make_op(output_path=str(folder))
    op.input_image = image  # as rendered (a local path is read only by execute)
    op.execute_complete(make_context(), prediction_event(succeeded()))
    assert [p.name for p in folder.iterdir()] == [name.format(pid=PID)]


# --- waiting in the worker -------------------------------------------------------------------------


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


# --- mapping, templating, extra link ---------------------------------------------------------------


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
    # Airflow 3.1's .partial() takes only BaseOperator's defaults, not an operator's own (README).
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
    """Airflow's log view links ``https?://\\S+``: a URL followed by ``;`` or ``,`` links to a 404."""
    import re

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
    from airflow_provider_kontext.compat import AirflowFailException

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
    from airflow_provider_kontext.compat import AirflowFailException

    event = prediction_event(make_prediction(status, error="NSFW content detected."))
    op = make_op(retry_failed_predictions=retry_failed_predictions)
    with pytest.raises(FluxKontextPredictionFailed) as info:
        op.execute_complete(make_context(), event)
    assert isinstance(info.value, AirflowFailException) is no_retry
    assert info.value.status == status


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


# --- every answer shape of the proxy family -------------------------------------------------------


def images_api_answer(*items: dict[str, Any]) -> Prediction:
    return Prediction.model_validate({"created": int(time.time()), "data": list(items)})


def test_a_b64_json_answer_is_saved_to_output_path(hook, tmp_path):
    answer = images_api_answer({"b64_json": base64.b64encode(PNG).decode(), "revised_prompt": "snowy mug"})
    hook.create_prediction.return_value = answer
    context = make_context()
    paths = make_op(output_path=str(tmp_path)).execute(context)
    assert len(paths) == 1
    assert ObjectStoragePath(paths[0]).read_bytes() == PNG
    summary = pushed(context)["prediction"]
    assert summary["revised_prompt"] == "snowy mug"
    assert summary["output_urls"] == ["data:..."]  # never the blob in the summary


def test_a_b64_json_answer_is_handed_on_as_a_data_uri(hook):
    hook.create_prediction.return_value = images_api_answer({"b64_json": base64.b64encode(JPEG).decode()})
    [uri] = make_op().execute(make_context())
    assert uri.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(uri.partition(",")[2]) == JPEG


def test_a_b64_json_answer_too_large_for_xcom_fails_without_retry(hook):
    from airflow_provider_kontext.edits.outputs import MAX_INLINE_OUTPUT_BYTES

    big = PNG + bytes(MAX_INLINE_OUTPUT_BYTES)
    hook.create_prediction.return_value = images_api_answer({"b64_json": base64.b64encode(big).decode()})
    with pytest.raises(FluxKontextPredictionFailedNoRetry, match="set output_path"):
        make_op().execute(make_context())


def test_an_answer_shape_we_cannot_use_fails_without_retry_naming_it(hook):
    hook.create_prediction.return_value = images_api_answer({"image_base64": "AAAA", "seed": 3})
    with pytest.raises(FluxKontextPredictionFailedNoRetry) as info:
        make_op().execute(make_context())
    message = str(info.value)
    assert "no output" in message
    assert "{created, data: [{image_base64, seed}]}" in message
    assert "AAAA" not in message  # keys only, never values
