"""Test the edit operator's completion: ``execute_complete``, downloads to ``output_path``.

Also every answer shape of the proxy family. The hook is a mock; nothing touches the network.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any
from unittest import mock

import pytest
from airflow.sdk import Asset, ObjectStoragePath
from airflow.sdk.execution_time.context import OutletEventAccessors

from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.exceptions import FluxKontextPredictionFailed, FluxKontextServerError
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.operators.kontext import FluxKontextPredictionFailedNoRetry

from .helpers import (
    IMAGE_URL,
    JPEG,
    OUT_URL,
    PID,
    PNG,
    PROMPT,
    STATE_KEY,
    FakeStore,
    logged,
    make_context,
    make_op,
    make_prediction,
    pushed,
    succeeded,
)

# --- execute_complete -----------------------------------------------------------------------------


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


def test_a_prediction_the_server_canceled_at_its_deadline_fails_as_a_timeout_with_retries(hook):
    """Check that a cancel at the ``Cancel-After`` the create sent is the edit's timeout, not a final cancel.

    The server reaches the deadline as the worker's clock does: whichever came first decided
    between a retryable timeout and a ``canceled`` that failed without retries.
    """
    at_deadline = make_prediction(
        "canceled", deadline="2025-05-01T10:05:00+00:00", completed_at="2025-05-01T10:05:00.2+00:00"
    )
    event = prediction_event(at_deadline)
    assert event.at_deadline
    with pytest.raises(FluxKontextPredictionFailed, match="did not finish within the timeout") as info:
        make_op().execute_complete(stored_context(), event.payload())
    assert not isinstance(info.value, FluxKontextPredictionFailedNoRetry)
    assert info.value.status == "timeout"
    hook.cancel_prediction.assert_not_called()  # the server already did

    earlier = make_prediction(  # canceled by someone a minute before the deadline: as it ended
        "canceled", deadline="2025-05-01T10:05:00+00:00", completed_at="2025-05-01T10:04:00+00:00"
    )
    assert not prediction_event(earlier).at_deadline
    with pytest.raises(FluxKontextPredictionFailedNoRetry):
        make_op().execute_complete(stored_context(), prediction_event(earlier).payload())
    assert not prediction_event(make_prediction("canceled")).at_deadline  # no deadline was sent


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


# --- output_path ----------------------------------------------------------------------------------


def writes(*payloads: bytes):
    """Return a ``hook.download`` side effect writing each payload into the file object it is given."""
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
