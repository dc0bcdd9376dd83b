"""Test ``FluxKontextEditOperator`` before and at the create: validation before any HTTP call.

Also the create request it sends, and Cancel-After from its timeout. The hook is a mock; nothing
sleeps or touches the network.
"""

from __future__ import annotations

import base64
import re
import time
from datetime import timedelta

import pendulum
import pytest
from airflow.sdk import DAG, ObjectStoragePath

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.models import Prediction, UploadedFile

from .helpers import (
    IMAGE_URL,
    JPEG,
    OUT_URL,
    PID,
    PNG,
    PROMPT,
    make_context,
    make_op,
    pushed,
    run_deferring,
    sent_input,
    succeeded,
)

# --- validation before any HTTP call --------------------------------------------------------------


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
    "kwargs", [{"wait_seconds": 0}, {"wait_seconds": 61}, {"poll_interval": 0}, {"timeout": -1}]
)
def test_bad_operator_arguments_rejected_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_op(**kwargs)


# --- the create request ---------------------------------------------------------------------------


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


def test_unset_arguments_are_not_sent_but_a_seed_is(hook):
    run_deferring(make_op(), make_context())
    sent = sent_input(hook)
    assert sent == {"prompt": PROMPT, "input_image": IMAGE_URL, "seed": sent["seed"]}
    assert 1 <= sent["seed"] < 2**31


def drawn(hook, op, context):
    hook.create_prediction.reset_mock()
    run_deferring(op, context)
    return sent_input(hook).get("seed")


def test_drawn_seed_stays_for_retries_and_changes_on_a_clear(hook):
    first = drawn(hook, make_op(), make_context(try_number=1, max_tries=2))
    assert drawn(hook, make_op(), make_context(try_number=2, max_tries=2)) == first  # a retry
    assert drawn(hook, make_op(), make_context(try_number=4, max_tries=5)) != first  # cleared
    cleared_run = make_context(try_number=2, max_tries=2)
    cleared_run["dag_run"].clear_number = 1
    assert drawn(hook, make_op(), cleared_run) != first
    assert drawn(hook, make_op(prompt="Make it blue"), make_context(max_tries=2)) != first


def test_given_seed_is_sent_and_zero_means_drawn(hook):
    assert drawn(hook, make_op(seed=42), make_context()) == 42
    assert drawn(hook, make_op(seed="7"), make_context()) == 7
    assert drawn(hook, make_op(seed=0), make_context()) == drawn(hook, make_op(), make_context())


def test_no_seed_drawn_for_a_model_without_a_known_seed_input(hook):
    assert drawn(hook, make_op(model="someone/another-model"), make_context()) is None


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


# --- Cancel-After / timeout -----------------------------------------------------------------------


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
    """The create's deadline (test_create_throttling.py): the edit's timeout from the try's start."""
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
