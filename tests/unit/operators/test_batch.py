"""Test ``FluxKontextBatchEditOperator`` against the emulator (real HTTP on 127.0.0.1).

``FluxKontextBatchEditOperator`` against the emulator (real HTTP on 127.0.0.1): results in input
order, the ledger in the task state store, the batch trigger, partial failure and its retry, lost
creates found again, pacing and size bounds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from airflow.sdk import Asset
from emulated import options, png, started

from airflow_provider_kontext.compat import AirflowFailException, TaskDeferred
from airflow_provider_kontext.edits.batch_ledger import BATCH_KEY, CREATED, CREATING, BatchLedger
from airflow_provider_kontext.edits.batch_results import joined_rows
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextBatchFailed,
    FluxKontextBatchFailedNoRetry,
    FluxKontextPredictionMayExistError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator
from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.triggers.batch import FluxKontextBatchTrigger

TOKEN = "r8_BatchTestToken_5f1e0c77"
PROMPT = "Make it cobalt blue"


class FakeStore:
    """The task state store over a dict (survives "retries" within a test); JSON values only."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sets = 0

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(json.dumps(self.data[key])) if key in self.data else default

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        assert value is not None
        self.data[key] = json.loads(json.dumps(value))
        self.sets += 1

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


@pytest.fixture
def emu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FluxKontextEmulator]:
    with started(request, token=TOKEN) as emulator:
        conn = {"conn_type": "fluxkontext", "host": emulator.base_url, "password": TOKEN}
        monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
        yield emulator


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "shots"
    folder.mkdir()
    for number in range(6):
        (folder / f"shot{number}.png").write_bytes(png(colour=(number * 40, 20, 20)))
    (folder / "notes.txt").write_text("not an image; not listed")
    return folder


def make_op(**kwargs: Any) -> FluxKontextBatchEditOperator:
    kwargs.setdefault("task_id", "edit_all")
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("deferrable", False)
    kwargs.setdefault("poll_interval", 0.1)
    kwargs.setdefault("min_defer_seconds", 0)
    return FluxKontextBatchEditOperator(**kwargs)


def make_context(store: Any) -> dict[str, Any]:
    """Return a try's context: every try of the task instance has the same identity and series."""
    ti = mock.MagicMock(name="ti", dag_id="dag", run_id="run", task_id="edit_all", map_index=-1, max_tries=2)
    return {"ti": ti, "task_state_store": store, "outlet_events": mock.MagicMock()}


def pushed(context: dict[str, Any], key: str) -> Any:
    values = [c.kwargs["value"] for c in context["ti"].xcom_push.call_args_list if c.kwargs["key"] == key]
    return values[-1]


def test_folder_batch_returns_outputs_in_input_order_with_manifest_and_one_asset_event(
    emu: FluxKontextEmulator, shots: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    asset = Asset("kontext://test/batch")
    store = FakeStore()
    context = make_context(store)
    result = make_op(input_images=str(shots), output_path=str(out), outlets=[asset]).execute(context)

    assert emu.created_count == 6
    rows = pushed(context, "predictions")
    assert [row["input_name"] for row in rows] == [f"shot{n}.png" for n in range(6)]
    for row, outputs in zip(rows, result, strict=True):
        assert row["status"] == "succeeded"
        assert outputs == row["outputs"]
        (path,) = outputs
        assert Path(path.removeprefix("file://")).name.startswith(f"shot{row['index']}-{row['prediction']}.")
        assert emu.predictions[row["prediction"]].prompt == PROMPT
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"succeeded": 6}
    header = pushed(context, "batch")
    assert header == {
        "images": 6,
        "counts": {"succeeded": 6},
        "model": "black-forest-labs/flux-kontext-dev",
        "prompt": PROMPT,
        "manifest": f"file://{out}/manifest.json",
        "parts": ["predictions"],
    }
    assert manifest["images"] == joined_rows(header, {"predictions": rows})  # the rows, each whole
    assert all("prompt" not in row and "model" not in row for row in rows)  # shared: in the header
    extra = context["outlet_events"][asset].extra
    assert extra == {"images": 6, "counts": {"succeeded": 6}, "manifest": f"file://{out}/manifest.json"}
    assert store.data[BATCH_KEY]["finished"] == {"try_number": None, "max_tries": 2, "clear_number": None}
    sent = [emu.predictions[row["prediction"]].input.get("seed") for row in rows]
    assert all(isinstance(seed, int) for seed in sent)  # drawn: none was given
    assert len(set(sent)) == 6  # one per image


def test_one_prompt_per_image_and_urls_without_output_path(emu: FluxKontextEmulator, shots: Path) -> None:
    images = sorted(str(p) for p in shots.glob("*.png"))[:3]
    prompts = ["red", "green", "blue"]
    context = make_context(FakeStore())
    result = make_op(input_images=images, prompt=prompts).execute(context)
    rows = pushed(context, "predictions")
    assert [emu.predictions[row["prediction"]].prompt for row in rows] == prompts
    assert all(outputs[0].startswith("http://127.0.0.1") for outputs in result)


@pytest.mark.parametrize(
    ("images", "prompt", "message"),
    [
        (["a.png"], ["one", "two"], "2 prompts for 1 images"),
        ("data:image/png;base64,AAAA", PROMPT, "a single image URL is not a list"),
        (42, PROMPT, "input_images: must be a list"),
    ],
)
def test_bad_arguments_fail_before_any_create(
    emu: FluxKontextEmulator, images: Any, prompt: Any, message: str
) -> None:
    with pytest.raises(AirflowFailException, match=message):
        make_op(input_images=images, prompt=prompt).execute(make_context(FakeStore()))
    assert emu.created_count == 0


def test_every_bad_image_is_named_before_any_create(emu: FluxKontextEmulator, shots: Path) -> None:
    (shots / "broken.png").write_bytes(b"not a png")
    images = [str(shots / "shot0.png"), str(shots / "broken.png"), str(shots / "missing.png")]
    with pytest.raises(AirflowFailException) as failure:
        make_op(input_images=images).execute(make_context(FakeStore()))
    text = str(failure.value)
    assert "2 of 3 images are not usable" in text
    assert "image 1 (broken.png)" in text
    assert "image 2 (missing.png)" in text
    assert emu.created_count == 0


def test_literal_bad_model_input_fails_at_parse_time() -> None:
    with pytest.raises(Exception, match="aspect_ratio"):
        make_op(input_images=[], aspect_ratio="5:1")


def test_deferred_batch_waits_in_one_trigger_and_resumes_from_the_store(
    emu: FluxKontextEmulator, shots: Path, tmp_path: Path
) -> None:
    store = FakeStore()
    op = make_op(input_images=str(shots), deferrable=True, output_path=str(tmp_path / "out"))
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(make_context(store))
    trigger = deferred.value.trigger
    assert isinstance(trigger, FluxKontextBatchTrigger)
    _, kwargs = trigger.serialize()
    assert set(kwargs["prediction_ids"].split(",")) == set(emu.predictions)
    assert "6 predictions" in repr(trigger)
    assert deferred.value.kwargs is None or "results" not in str(deferred.value.kwargs)
    assert kwargs["min_defer_seconds"] == 0
    assert isinstance(kwargs["deferred_at"], float)

    events = asyncio.run(_events(trigger))
    assert [event.payload["status"] for event in events] == ["done"]
    assert events[0].payload["counts"] == {"succeeded": 6}
    assert len(json.dumps(events[0].payload)) < 200  # counts only, however large the batch

    context = make_context(store)
    result = make_op(
        input_images=str(shots), deferrable=True, output_path=str(tmp_path / "out")
    ).execute_complete(context, events[0].payload)
    assert len(result) == 6
    assert all(len(outputs) == 1 for outputs in result)
    assert emu.created_count == 6


def test_a_batch_whose_edits_end_within_the_hold_finishes_without_deferring(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    context = make_context(FakeStore())
    result = make_op(input_images=str(shots), deferrable=True, min_defer_seconds=60).execute(context)
    assert len(result) == 6
    assert all(len(outputs) == 1 for outputs in result)
    assert emu.created_count == 6


@options(prediction_seconds=30.0)
def test_after_the_hold_only_what_still_runs_is_deferred(emu: FluxKontextEmulator, shots: Path) -> None:
    op = make_op(input_images=str(shots), deferrable=True, min_defer_seconds=0.3)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(make_context(FakeStore()))
    _, kwargs = deferred.value.trigger.serialize()
    assert set(kwargs["prediction_ids"].split(",")) == set(emu.predictions)
    assert kwargs["min_defer_seconds"] == 0.3


class MarkCountingStore(FakeStore):
    """Counts the writes that store a new "creating" mark (each must precede its create)."""

    def __init__(self, emu: FluxKontextEmulator) -> None:
        super().__init__()
        self.emu = emu
        self.mark_writes = 0
        self.unmarked_creates = 0

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        before = self.data.get(key) or {}
        marked = {i for i, entry in value.items() if isinstance(entry, dict) and entry.get("s") == CREATING}
        was = {i for i, entry in before.items() if isinstance(entry, dict) and entry.get("s") == CREATING}
        if key.startswith(f"{BATCH_KEY}/") and marked - was:
            self.mark_writes += 1
        super().set(key, value, retention=retention)


def test_creates_queued_together_share_the_write_of_their_marks(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    store = MarkCountingStore(emu)
    # Creates 2 s apart: all six marks are made long before the second create's turn.
    op = make_op(input_images=str(shots), creates_per_minute=30, max_concurrent_creates=6)
    result = op.execute(make_context(store))
    assert all(len(outputs) == 1 for outputs in result)
    assert emu.created_count == 6
    assert store.mark_writes <= 3  # one write per create before: 6


async def _events(trigger: FluxKontextBatchTrigger) -> list[Any]:
    return [event async for event in trigger.run()]


def test_partial_failure_fails_listing_which_keeps_successes_and_retry_redoes_only_those(
    emu: FluxKontextEmulator, shots: Path, tmp_path: Path
) -> None:
    emu.faults.fail_predictions(2, error="CUDA out of memory")
    store = FakeStore()
    out = tmp_path / "out"
    with pytest.raises(FluxKontextBatchFailedNoRetry) as failure:
        make_op(input_images=str(shots), output_path=str(out)).execute(make_context(store))
    assert "2 of 6 images were not edited" in str(failure.value)
    assert "CUDA out of memory" in str(failure.value)
    assert len(list(out.glob("shot*"))) == 4  # the successes are kept
    assert emu.created_count == 6

    # A failed prediction is not redone by a retry unless asked...
    with pytest.raises(FluxKontextBatchFailedNoRetry):
        make_op(input_images=str(shots), output_path=str(out)).execute(make_context(store))
    assert emu.created_count == 6
    # ...and with retry_failed_predictions only the two failed images are edited again.
    context = make_context(store)
    result = make_op(input_images=str(shots), output_path=str(out), retry_failed_predictions=True).execute(
        context
    )
    assert emu.created_count == 8
    assert all(len(outputs) == 1 for outputs in result)
    assert [row["status"] for row in pushed(context, "predictions")] == ["succeeded"] * 6


def test_fail_on_partial_false_succeeds_with_failures_recorded(emu: FluxKontextEmulator, shots: Path) -> None:
    emu.faults.fail_predictions(1)
    context = make_context(FakeStore())
    result = make_op(input_images=str(shots), fail_on_partial=False).execute(context)
    rows = pushed(context, "predictions")
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(failed) == 1
    assert result[failed[0]["index"]] == []
    assert sum(1 for outputs in result if outputs) == 5


def test_lost_creates_are_found_in_the_list_and_never_created_twice(
    emu: FluxKontextEmulator, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check that a retry adopts a create whose answer was lost and creates only the one that never left.

    Image 1's create reached the server but its answer was lost; image 3's never left: the retry
    adopts the first from the account's list and creates only the second.
    """
    real_create = FluxKontextHook.create_prediction
    lost_answers = {"shot1.png"}
    never_sent = {"shot3.png"}

    def create(self: FluxKontextHook, model: str, model_input: dict[str, Any], **kwargs: Any) -> Any:
        name = _name_of(model_input)
        if name in never_sent:
            raise FluxKontextPredictionMayExistError(
                "connection reset", method="POST", path="/v1/predictions"
            )
        prediction = real_create(self, model, model_input, **kwargs)
        if name in lost_answers:
            raise FluxKontextPredictionMayExistError("read timed out", method="POST", path="/v1/predictions")
        return prediction

    colours = {png(colour=(n * 40, 20, 20)): f"shot{n}.png" for n in range(6)}

    def _name_of(model_input: dict[str, Any]) -> str:
        import base64

        data = base64.b64decode(model_input["input_image"].partition(",")[2])
        return colours[data]

    store = FakeStore()
    monkeypatch.setattr(FluxKontextHook, "create_prediction", create)
    with pytest.raises(FluxKontextBatchFailed) as failure:
        make_op(input_images=str(shots)).execute(make_context(store))
    assert not isinstance(failure.value, AirflowFailException)  # retryable
    assert emu.created_count == 5
    ledger = BatchLedger(store, 6, durable=True)
    ledger.load()
    assert [ledger.entry(n)["s"] for n in (1, 3)] == [CREATING, CREATING]  # type: ignore[index]

    monkeypatch.setattr(FluxKontextHook, "create_prediction", real_create)
    context = make_context(store)
    result = make_op(input_images=str(shots)).execute(context)
    assert emu.created_count == 6  # image 1 adopted, image 3 created: each edited once
    assert all(len(outputs) == 1 for outputs in result)
    rows = pushed(context, "predictions")
    assert len({row["prediction"] for row in rows}) == 6


def test_resume_after_a_killed_worker_waits_for_what_was_created(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    """A worker killed after some creates: its record says which exist; the next try creates the rest."""
    store = FakeStore()
    first = make_op(input_images=str(shots), deferrable=True)
    with pytest.raises(TaskDeferred):
        first.execute(make_context(store))
    # Forget images 4 and 5 as if the worker died before creating them (their predictions vanish too).
    ledger = BatchLedger(store, 6, durable=True)
    ledger.load()
    assert all(ledger.entry(n)["s"] == CREATED for n in range(6))  # type: ignore[index]
    for n in (4, 5):
        ledger.drop(n)
    created_before = emu.created_count
    context = make_context(store)
    result = make_op(input_images=str(shots)).execute(context)
    assert emu.created_count == created_before + 2
    assert all(len(outputs) == 1 for outputs in result)


def test_refused_token_stops_the_creates_and_fails_without_retry(
    emu: FluxKontextEmulator, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = {"conn_type": "fluxkontext", "host": emu.base_url, "password": "r8_wrong"}
    monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
    with pytest.raises(FluxKontextBatchFailedNoRetry, match="Creating stopped"):
        make_op(input_images=str(shots), max_concurrent_creates=1).execute(make_context(FakeStore()))
    assert emu.created_count == 0


def test_batch_key_names_the_store_entries(emu: FluxKontextEmulator, shots: Path) -> None:
    store = FakeStore()
    with pytest.raises(TaskDeferred):
        make_op(input_images=str(shots), deferrable=True).execute(make_context(store))
    assert sorted(store.data) == [BATCH_KEY, f"{BATCH_KEY}/0"]
    assert store.data[BATCH_KEY]["n"] == 6


def test_images_added_to_the_folder_between_tries_are_matched_by_content(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    store = FakeStore()
    with pytest.raises(TaskDeferred) as deferred:
        make_op(input_images=str(shots), deferrable=True).execute(make_context(store))
    (shots / "shot0a.png").write_bytes(png(colour=(1, 2, 3)))  # listed second from now on
    with pytest.raises(FluxKontextBatchFailed, match="input_images changed while the batch ran"):
        make_op(input_images=str(shots), deferrable=True).execute_complete(
            make_context(store), {"status": "done", "counts": {}}
        )
    assert deferred.value.trigger is not None
    context = make_context(store)
    result = make_op(input_images=str(shots)).execute(context)
    assert emu.created_count == 7  # the six already started are not created again
    rows = pushed(context, "predictions")
    assert rows[1]["input_name"] == "shot0a.png"
    assert all(len(outputs) == 1 for outputs in result)
    assert len({row["prediction"] for row in rows}) == 7


@options(prediction_seconds=30.0)
@pytest.mark.parametrize(
    "timeout",
    [
        pytest.param(1, id="our-clock-first"),  # under Cancel-After's 5 s least: the wait cancels them
        pytest.param(6, id="server-first"),  # the server cancels them at the Cancel-After it was sent
    ],
)
def test_predictions_past_the_timeout_are_canceled_and_fail_as_a_retryable_timeout(
    emu: FluxKontextEmulator, shots: Path, timeout: int
) -> None:
    """Check both clocks that can reach the timeout against the emulator: either way a retryable timeout.

    When the server reached it first (``Cancel-After``), the predictions ended ``canceled``, which
    the batch recorded as a final failure.
    """
    images = sorted(str(p) for p in shots.glob("*.png"))[:2]
    with pytest.raises(FluxKontextBatchFailed) as failure:
        make_op(input_images=images, timeout=timeout).execute(make_context(FakeStore()))
    assert not isinstance(failure.value, AirflowFailException)  # a timeout may be retried
    assert "2 of 2 images were not edited" in str(failure.value)
    assert "timeout" in str(failure.value)
    assert {emu.prediction(pid).status.value for pid in emu.predictions} == {"canceled"}


def test_an_unforeseen_error_in_one_create_is_reported_and_leaves_a_retryable_failure(
    emu: FluxKontextEmulator, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import airflow_provider_kontext.edits.request as edit_request

    real = edit_request.validated_request

    def flaky(model: str, arguments: dict[str, Any], image: Any, *args: Any) -> Any:
        if str(image).endswith("shot2.png"):
            raise RuntimeError("disk on fire")
        return real(model, arguments, image, *args)

    monkeypatch.setattr(edit_request, "validated_request", flaky)
    with pytest.raises(FluxKontextBatchFailed, match="disk on fire") as failure:
        make_op(input_images=str(shots)).execute(make_context(FakeStore()))
    assert not isinstance(failure.value, AirflowFailException)
    assert emu.created_count == 5


class FakeTi:
    """A task instance whose XComs of this try are a dict (what survives a deferral)."""

    task_id = "edit_all"
    map_index = -1

    def __init__(self) -> None:
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = json.loads(json.dumps(value))

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int) -> Any:
        assert (task_ids, map_indexes) == (self.task_id, self.map_index)
        return self.xcoms.get(key)


def test_without_a_task_state_store_the_record_rides_the_trys_xcoms_across_the_deferral(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    """Airflow < 3.3: no store; the batch still resumes after its deferral with every result."""
    ti = FakeTi()
    context = {"ti": ti, "outlet_events": mock.MagicMock()}
    with pytest.raises(TaskDeferred) as deferred:
        make_op(input_images=str(shots), deferrable=True).execute(context)
    (event,) = asyncio.run(_events(deferred.value.trigger))
    result = make_op(input_images=str(shots), deferrable=True).execute_complete(context, event.payload)
    assert all(len(outputs) == 1 for outputs in result)
    assert emu.created_count == 6
    assert [row["status"] for row in ti.xcoms["predictions"]] == ["succeeded"] * 6


def series_context(store: Any, try_number: int, max_tries: int, clear_number: int = 0) -> dict[str, Any]:
    context = make_context(store)
    context["ti"].try_number, context["ti"].max_tries = try_number, max_tries
    context["dag_run"] = mock.Mock(clear_number=clear_number)
    return context


def test_a_retry_after_the_batch_finished_completes_from_the_record_and_a_clear_edits_afresh(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    """Check that a finished batch's record is marked finished, not deleted.

    The record is marked finished, not deleted: Airflow may fail the try after the batch finished
    (its scheduler race, a kill), and the retry must not pay for every image again.
    """
    store = FakeStore()
    first = make_op(input_images=str(shots)).execute(series_context(store, 1, 2))
    assert emu.created_count == 6
    retry = make_op(input_images=str(shots)).execute(series_context(store, 2, 2))
    assert retry == first
    assert emu.created_count == 6
    cleared = make_op(input_images=str(shots)).execute(series_context(store, 3, 4))
    assert emu.created_count == 12
    assert cleared != first


def test_fail_on_partial_false_a_clear_edits_every_image_afresh(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    emu.faults.fail_predictions(1)
    store = FakeStore()
    first = make_op(input_images=str(shots), fail_on_partial=False).execute(series_context(store, 1, 1))
    assert sum(1 for outputs in first if outputs) == 5
    again = make_op(input_images=str(shots), fail_on_partial=False).execute(series_context(store, 2, 1))
    assert again == first
    assert emu.created_count == 6
    make_op(input_images=str(shots), fail_on_partial=False).execute(series_context(store, 1, 1, 1))
    assert emu.created_count == 12  # cleared (the run's clear_number rose): every image afresh


@options(prediction_seconds=30.0)
def test_without_a_store_a_retryable_partial_failure_fails_without_retries(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    """Airflow < 3.3: a retry starts with the try's XComs cleared and would pay again for every image."""
    images = sorted(str(p) for p in shots.glob("*.png"))[:2]
    context = {"ti": FakeTi(), "outlet_events": mock.MagicMock()}
    with pytest.raises(FluxKontextBatchFailedNoRetry, match="no task state store") as failure:
        make_op(input_images=images, timeout=1).execute(context)
    assert "would pay again for the images that succeeded" in str(failure.value)
    assert "Airflow >= 3.3" in str(failure.value)


def test_a_create_that_may_have_reached_the_server_keeps_its_mark_a_refused_one_drops_it(
    emu: FluxKontextEmulator, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check what a failed create leaves in the record: "creating" after an OSError, nothing after a 400.

    A connection error (OSError) leaves "creating" so a retry searches the list; a 400 answer
    (nothing created) drops it. The refusal's text is redacted wherever it is kept.
    """
    real_create = FluxKontextHook.create_prediction
    calls: list[int] = []

    def create(self: FluxKontextHook, model: str, model_input: dict[str, Any], **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection reset by peer")
        if len(calls) == 2:
            assert self.settings is not None  # the connection looked up, as a real create does
            raise FluxKontextAPIError(f"bad request (token {TOKEN})", status=400)
        if len(calls) == 3:
            assert self.settings is not None
            raise FluxKontextAPIError(f"invalid input for {TOKEN}", status=422)
        return real_create(self, model, model_input, **kwargs)

    monkeypatch.setattr(FluxKontextHook, "create_prediction", create)
    store = FakeStore()
    context = make_context(store)
    with pytest.raises(FluxKontextBatchFailed):
        make_op(input_images=str(shots), max_concurrent_creates=1).execute(context)
    ledger = BatchLedger(store, 6, durable=True)
    ledger.load()
    states = [(ledger.entry(n) or {}).get("s") for n in range(6)]
    assert states[0] == CREATING  # a retry looks for it before creating again
    assert states[1] is None  # refused: nothing to look for
    assert states[2] == "rejected"
    kept = json.dumps(store.data) + json.dumps(pushed(context, "predictions"))
    assert TOKEN not in kept
    assert "***" in kept
