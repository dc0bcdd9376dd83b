"""Test how ``FluxKontextBatchEditOperator`` recovers lost creates and what it does when killed.

Against the emulator (real HTTP on 127.0.0.1): a lost create is adopted by the single edit's search
(exactly one match, never one recorded for another image) and an ambiguous one is created anew;
``on_kill`` cancels what the batch still waits for and keeps what succeeded.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from emulated import options, png

from airflow_provider_kontext.compat import TaskDeferred
from airflow_provider_kontext.edits.batch_ledger import CREATED, CREATING, KILLED, BatchLedger
from airflow_provider_kontext.exceptions import (
    FluxKontextBatchFailed,
    FluxKontextBatchFailedNoRetry,
    FluxKontextPredictionMayExistError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.triggers.batch import FluxKontextBatchTrigger
from tests.unit.operators.test_batch import FakeStore, emu, make_context, make_op, pushed, shots

__all__ = ["emu", "shots"]  # the fixtures, shared with test_batch

COLOURS = {png(colour=(n * 40, 20, 20)): f"shot{n}.png" for n in range(6)}


def name_of(model_input: dict[str, Any]) -> str:
    return COLOURS[base64.b64decode(model_input["input_image"].partition(",")[2])]


def lose_answers(monkeypatch: pytest.MonkeyPatch, names: set[str], sent: dict[str, dict[str, Any]]) -> None:
    """Make the creates of the images ``names`` reach the server and lose their answers."""
    real_create = FluxKontextHook.create_prediction

    def create(self: FluxKontextHook, model: str, model_input: dict[str, Any], **kwargs: Any) -> Any:
        prediction = real_create(self, model, model_input, **kwargs)
        if name_of(model_input) in names:
            sent[name_of(model_input)] = model_input
            raise FluxKontextPredictionMayExistError("read timed out", method="POST", path="/v1/predictions")
        return prediction

    monkeypatch.setattr(FluxKontextHook, "create_prediction", create)


def test_a_lost_create_is_adopted_and_an_ambiguous_one_is_created_afresh(
    emu: FluxKontextEmulator, shots: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Check that a lost create is adopted when it is the only match, created anew when ambiguous.

    Image 1's lost create is the only match: adopted. Image 2's has a twin (another task asked the
    very same edit in the window): the search cannot tell which is ours, so image 2 is created anew.
    """
    real_create = FluxKontextHook.create_prediction
    sent: dict[str, dict[str, Any]] = {}
    lose_answers(monkeypatch, {"shot1.png", "shot2.png"}, sent)
    store = FakeStore()
    with pytest.raises(FluxKontextBatchFailed):
        make_op(input_images=str(shots)).execute(make_context(store))
    assert emu.created_count == 6
    monkeypatch.setattr(FluxKontextHook, "create_prediction", real_create)
    twin = FluxKontextHook().create_prediction("black-forest-labs/flux-kontext-dev", sent["shot2.png"])
    recorded = {str(entry["id"]) for _, entry in _entries(store) if entry and entry.get("id")}
    orphans = set(emu.predictions) - recorded - {twin.id}  # the lost creates' predictions
    assert len(orphans) == 2

    context = make_context(store)
    capfd.readouterr()
    result = make_op(input_images=str(shots)).execute(context)
    logged = "".join(capfd.readouterr())
    assert emu.created_count == 8  # 6, the twin, and image 2 again; image 1 adopted
    assert all(len(outputs) == 1 for outputs in result)
    rows = pushed(context, "predictions")
    assert rows[1]["prediction"] in orphans
    assert rows[2]["prediction"] not in orphans | {twin.id}
    assert "cannot tell which is ours" in logged
    assert "Adopting prediction" in logged


def test_a_prediction_recorded_for_another_image_is_never_adopted(
    emu: FluxKontextEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check that the search leaves out the predictions other images of the batch recorded.

    The same image twice with one prompt: the first's prediction is recorded; the second's lost
    create is found among the others (one match once the recorded one is left out).
    """
    image = tmp_path / "shot0.png"
    image.write_bytes(png(colour=(0, 20, 20)))
    calls: list[str] = []
    real_create = FluxKontextHook.create_prediction

    def create(self: FluxKontextHook, model: str, model_input: dict[str, Any], **kwargs: Any) -> Any:
        prediction = real_create(self, model, model_input, **kwargs)
        calls.append(prediction.id)
        if len(calls) == 2:
            raise FluxKontextPredictionMayExistError("read timed out", method="POST", path="/v1/predictions")
        return prediction

    monkeypatch.setattr(FluxKontextHook, "create_prediction", create)
    store = FakeStore()
    op_kwargs = {"input_images": [str(image), str(image)], "max_concurrent_creates": 1}
    with pytest.raises(FluxKontextBatchFailed):
        make_op(**op_kwargs).execute(make_context(store))
    monkeypatch.setattr(FluxKontextHook, "create_prediction", real_create)
    context = make_context(store)
    make_op(**op_kwargs).execute(context)
    assert emu.created_count == 2
    assert sorted(row["prediction"] for row in pushed(context, "predictions")) == sorted(calls)


def _entries(store: FakeStore) -> list[tuple[int, dict[str, Any] | None]]:
    ledger = BatchLedger(store, 6, durable=True)
    ledger.load()
    assert [(entry or {}).get("s") for _, entry in ledger.entries()].count(CREATING) == 2
    return list(ledger.entries())


# --- on_kill ------------------------------------------------------------------------------------


def test_a_kill_cancels_only_what_is_unfinished_and_records_it_for_the_retry() -> None:
    """Check what ``on_kill``'s cancel pass touches, with a hook that answers as Replicate would.

    Image 0 succeeded (outputs saved): untouched. 1 is running: canceled, recorded ``killed``.
    2 succeeded just before its cancel arrived: kept. 3 was seen to succeed by the wait: untouched.
    4's cancel fails: left for a retry to wait for. 5's create is under way (no id): nothing to cancel.
    """
    from airflow_provider_kontext.edits.batch_ledger import KILLED, SUCCEEDED
    from airflow_provider_kontext.exceptions import FluxKontextServerError
    from airflow_provider_kontext.operators.batch_kill import cancel_unfinished

    store = FakeStore()
    ledger = BatchLedger(store, 6, durable=True)
    ledger.open_window("2026-12-06T08:00:00+00:00")
    ledger.put(0, s=SUCCEEDED, fp="f0", id="p0", o=["/out/0.png"])
    for n in range(1, 5):
        ledger.put(n, s=CREATED, fp=f"f{n}", id=f"p{n}", t=1.0)
    ledger.put(5, s=CREATING, fp="f5", c=1.0)
    answers = {"p1": "canceled", "p2": "succeeded"}
    asked: list[str] = []

    def cancel(prediction_id: str) -> Any:
        asked.append(prediction_id)
        if prediction_id == "p4":
            raise FluxKontextServerError("502 from the API", status=502)
        return mock.Mock(status=mock.Mock(value=answers[prediction_id]))

    hook = mock.Mock(cancel_prediction=cancel)
    cancel_unfinished(hook, ledger, {"p3": {"status": "succeeded"}}, mock.Mock()).join(10)

    assert sorted(asked) == ["p1", "p2", "p4"]
    reread = BatchLedger(store, 6, durable=True)
    reread.load()
    states = [(reread.entry(n) or {}).get("s") for n in range(6)]
    assert states == [SUCCEEDED, KILLED, CREATED, CREATED, CREATED, CREATING]
    assert (reread.entry(1) or {})["id"] == "p1"  # which prediction the kill canceled stays known


@options(prediction_seconds=30.0)
def test_killing_the_waiting_batch_cancels_its_predictions_and_a_retry_edits_them_again(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    store = FakeStore()
    op = make_op(input_images=str(shots))
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            op.execute(make_context(store))
        except BaseException as exc:  # the test reads it below
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    _until(lambda: emu.created_count == 6 and op._creator is not None and op._creator.created == 6)
    op.on_kill()
    worker.join(60)
    assert not worker.is_alive()
    assert {emu.prediction(pid).status.value for pid in emu.predictions} == {"canceled"}
    error = outcome["error"]
    assert isinstance(error, FluxKontextBatchFailed)  # retryable: the kill canceled them, not the model
    assert not isinstance(error, FluxKontextBatchFailedNoRetry)
    assert "6 of 6 images were not edited" in str(error)
    assert "killed" in str(error)

    with pytest.raises(TaskDeferred):  # the retry creates all six again, then waits for them
        make_op(input_images=str(shots), deferrable=True).execute(make_context(store))
    assert emu.created_count == 12


def test_a_kill_recorded_while_the_batch_finishes_stands(
    emu: FluxKontextEmulator, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check that the finish skips predictions the kill recorded after it listed what to settle.

    ``on_kill`` runs on a thread of its own and may record its cancels while the worker's wait is
    settling the same predictions: the finish failed with a ``KeyError`` on the first of them.
    """
    from airflow_provider_kontext.operators import batch_finish
    from airflow_provider_kontext.operators.batch_kill import KILLED_WHY

    real_settle = batch_finish.BatchFinisher.settle

    def settle_after_a_kill(self: Any, items: Any, pending: Any, finals: Any, message: Any) -> None:
        for index, entry in list(self.ledger.entries()):  # what cancel_one records, meanwhile
            if entry and entry.get("s") == CREATED:
                self.ledger.put(index, flush=False, **{**entry, "s": KILLED, "e": KILLED_WHY})
        real_settle(self, items, pending, finals, message)

    monkeypatch.setattr(batch_finish.BatchFinisher, "settle", settle_after_a_kill)
    store = FakeStore()
    with pytest.raises(FluxKontextBatchFailed) as info:
        make_op(input_images=str(shots)).execute(make_context(store))
    assert not isinstance(info.value, FluxKontextBatchFailedNoRetry)
    assert "6 of 6 images were not edited" in str(info.value)
    reread = BatchLedger(store, 6, durable=True)
    reread.load()
    assert {str((entry or {}).get("s")) for _, entry in reread.entries()} == {KILLED}


def test_a_kill_and_the_finish_recording_the_same_prediction_leave_it_killed() -> None:
    """Check that the kill's record stands whichever of the two records an image first.

    The finish read an image's entry, worked out the outcome, then wrote the entry back: a cancel
    that ``on_kill``'s thread recorded in between was overwritten with ``canceled``, a final failure
    a retry does not redo. The other order (the finish first) must end ``killed`` too.
    """
    from types import SimpleNamespace

    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.operators.batch_finish import BatchFinisher
    from airflow_provider_kontext.operators.batch_kill import cancel_one

    canceled = SimpleNamespace(status=SimpleNamespace(value="canceled"))
    kill_hook = SimpleNamespace(cancel_prediction=lambda prediction_id: canceled)
    log = mock.Mock()
    ledger = BatchLedger(FakeStore(), 2, durable=True)
    for n in (0, 1):
        ledger.put(n, s=CREATED, fp=f"f{n}", id=f"p{n}", t=1.0)

    def redact(text: str) -> str:  # the kill's thread cancels image 0 while the finish records it
        if ledger.entry(0) and ledger.entry(0).get("s") == CREATED:  # type: ignore[union-attr]
            assert cancel_one(kill_hook, ledger, 0, "p0", log)
        return text

    op = SimpleNamespace(hook=SimpleNamespace(redact=redact), _timeout_seconds=lambda: 60.0)
    items = [BatchItem(n, f"{n}.png", "p", None, f"{n}.png", f"f{n}") for n in (0, 1)]
    ended = {f"p{n}": {"id": f"p{n}", "status": "canceled", "error": "Prediction canceled."} for n in (0, 1)}
    BatchFinisher(op, ledger, log=log).settle(items, dict.fromkeys(ended, time.time() + 600), ended, None)

    assert ledger.entry(0)["s"] == KILLED  # type: ignore[index]
    assert ledger.entry(1)["s"] == "canceled"  # type: ignore[index]
    assert cancel_one(kill_hook, ledger, 1, "p1", log)  # the kill after the finish recorded it
    assert ledger.entry(1)["s"] == KILLED  # type: ignore[index]


def _created_ledger(store: Any, try_number: int) -> BatchLedger:
    ledger = BatchLedger(store, 2, durable=True)
    ledger.open_window("2026-12-06T00:00:00+00:00")  # the record's header: a later load finds it
    for n in (0, 1):
        ledger.put(n, s=CREATED, fp=f"f{n}", id=f"p{n}", t=1.0, r=try_number)
    return ledger


def _settle_canceled(ledger: BatchLedger, try_number: int) -> None:
    from types import SimpleNamespace

    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.operators.batch_finish import BatchFinisher

    op = SimpleNamespace(hook=SimpleNamespace(redact=str), _timeout_seconds=lambda: 60.0)
    items = [BatchItem(n, f"{n}.png", "p", None, f"{n}.png", f"f{n}") for n in (0, 1)]
    ended = {f"p{n}": {"id": f"p{n}", "status": "canceled", "error": None} for n in (0, 1)}
    finisher = BatchFinisher(op, ledger, log=mock.Mock(), try_number=try_number)
    finisher.settle(items, dict.fromkeys(ended, time.time() + 600), ended, None)


def test_a_kill_stores_its_mark_before_it_cancels_so_a_lost_answer_still_ends_killed() -> None:
    """Check that the kill's mark is stored before each cancel goes out, and read as a kill later.

    A cancel the server applied but whose answer was lost recorded nothing, and neither did a
    process that died before the kill's one write: the finish then read the prediction ``canceled``,
    a final failure no retry redoes.
    """
    from types import SimpleNamespace

    from airflow_provider_kontext.exceptions import FluxKontextServerError
    from airflow_provider_kontext.operators.batch_kill import cancel_unfinished

    store = FakeStore()
    ledger = _created_ledger(store, try_number=1)
    stored_marks: list[Any] = []

    def cancel_applied_then_answer_lost(prediction_id: str) -> Any:
        reread = BatchLedger(store, 2, durable=True)
        reread.load()
        stored_marks.append((reread.entry(int(prediction_id[1:])) or {}).get("k"))
        raise FluxKontextServerError(status=502, title="Bad Gateway", method="POST", path="/cancel")

    hook = SimpleNamespace(cancel_prediction=cancel_applied_then_answer_lost)
    cancel_unfinished(hook, ledger, {}, mock.Mock(), seconds=30).join(30)
    assert stored_marks == [1, 1]
    assert {str((entry or {}).get("s")) for _, entry in ledger.entries()} == {CREATED}  # nothing recorded

    later = BatchLedger(store, 2, durable=True)  # the same try's finish, or one in another process
    later.load()
    _settle_canceled(later, try_number=1)
    assert [(entry or {}).get("s") for _, entry in later.entries()] == [KILLED, KILLED]


def test_a_prediction_an_earlier_try_created_and_found_canceled_is_taken_for_a_kill() -> None:
    """Check that the finish records a cancel nobody recorded of an earlier try's prediction ``killed``.

    A kill of the deferred task cancels in the triggerer, which cannot write the record.
    """
    earlier = _created_ledger(FakeStore(), try_number=1)
    _settle_canceled(earlier, try_number=2)
    assert [(entry or {}).get("s") for _, entry in earlier.entries()] == [KILLED, KILLED]
    this_try = _created_ledger(FakeStore(), try_number=2)  # canceled by someone else: as it ended
    _settle_canceled(this_try, try_number=2)
    assert [(entry or {}).get("s") for _, entry in this_try.entries()] == ["canceled", "canceled"]


def test_a_prediction_the_server_canceled_at_its_deadline_is_recorded_a_timeout() -> None:
    """Check that the batch records a cancel at the ``Cancel-After`` its create sent as ``timeout``.

    Recorded ``canceled``, it was a final failure; the batch's own deadline gives ``timeout``, which
    a retry redoes.
    """
    from types import SimpleNamespace

    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.operators.batch_finish import BatchFinisher

    ledger = _created_ledger(FakeStore(), try_number=1)
    op = SimpleNamespace(hook=SimpleNamespace(redact=str), _timeout_seconds=lambda: 60.0)
    items = [BatchItem(n, f"{n}.png", "p", None, f"{n}.png", f"f{n}") for n in (0, 1)]
    deadline = "2026-12-06T10:01:00+00:00"
    ended = {
        "p0": {"id": "p0", "status": "canceled", "deadline": deadline, "completed_at": deadline},
        "p1": {
            "id": "p1",
            "status": "canceled",
            "deadline": deadline,
            "completed_at": "2026-12-06T10:00:10Z",
        },
    }
    BatchFinisher(op, ledger, log=mock.Mock(), try_number=1).settle(
        items, dict.fromkeys(ended, time.time() + 600), ended, None
    )
    assert [(entry or {}).get("s") for _, entry in ledger.entries()] == ["timeout", "canceled"]


@options(prediction_seconds=30.0)
def test_a_retry_after_the_deferred_batch_was_killed_edits_the_canceled_images_again(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    store = FakeStore()
    with pytest.raises(TaskDeferred) as deferred:
        make_op(input_images=str(shots), deferrable=True).execute(make_context(store))
    _, kwargs = deferred.value.trigger.serialize()
    asyncio.run(FluxKontextBatchTrigger(**kwargs).on_kill())  # the triggerer cancels all six
    assert emu.created_count == 6

    assert {emu.prediction(pid).status.value for pid in emu.predictions} == {"canceled"}
    earlier = set(emu.predictions)

    with pytest.raises(TaskDeferred):  # the retry creates each canceled image again, then waits
        make_op(input_images=str(shots), deferrable=True).execute(make_context(store))

    assert emu.created_count == 12
    reread = BatchLedger(store, 6, durable=True)
    reread.load()
    assert {str((entry or {}).get("s")) for _, entry in reread.entries()} == {CREATED}
    assert not {str((entry or {}).get("id")) for _, entry in reread.entries()} & earlier


def test_a_prediction_that_succeeded_just_before_its_timeout_cancel_is_kept() -> None:
    """Check that the finish keeps what a timeout's cancel finds made, and waits on what it could not cancel.

    Both were recorded ``timeout``, and a retry paid for them again.
    """
    from types import SimpleNamespace

    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.models import Prediction
    from airflow_provider_kontext.operators.batch_finish import BatchFinisher

    ledger = _created_ledger(FakeStore(), try_number=1)
    succeeded = Prediction.model_validate(
        {"id": "p0", "status": "succeeded", "output": ["https://example.com/p0.png"]}
    )
    op = SimpleNamespace(
        hook=SimpleNamespace(redact=str),
        _timeout_seconds=lambda: 60.0,
        _cancel=lambda prediction_id, why: succeeded if prediction_id == "p0" else None,
        _keep_outputs=lambda event, name, where: [f"/out/{event.prediction_id}.png"],
        output_path="/out",
        max_concurrent_downloads=2,
    )
    items = [BatchItem(n, f"{n}.png", "p", None, f"{n}.png", f"f{n}") for n in (0, 1)]
    finisher = BatchFinisher(op, ledger, log=mock.Mock(), try_number=1)
    running = {pid: {"id": pid, "status": "processing"} for pid in ("p0", "p1")}

    async def read(unread: list[str]) -> dict[str, dict[str, Any]]:
        return {pid: running[pid] for pid in unread}

    finisher._read = read  # type: ignore[method-assign]
    finisher.settle(items, {"p0": 0.0, "p1": 0.0}, {}, None)  # both past their deadline

    assert ledger.entry(0) == {
        "s": "succeeded",
        "fp": "f0",
        "id": "p0",
        "t": 1.0,
        "r": 1,
        "o": ["/out/p0.png"],
    }
    assert (ledger.entry(1) or {}).get("s") == CREATED  # not canceled: a retry waits for it
    assert "not canceled" in finisher.unsettled[1]


def test_killing_the_batch_while_it_creates_stops_the_creates(emu: FluxKontextEmulator, shots: Path) -> None:
    store = FakeStore()
    op = make_op(input_images=str(shots), creates_per_minute=120, max_concurrent_creates=1)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            op.execute(make_context(store))
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    _until(lambda: emu.created_count >= 2)
    op.on_kill()
    worker.join(60)
    assert not worker.is_alive()
    assert emu.created_count < 6  # the creates stopped
    assert isinstance(outcome["error"], FluxKontextBatchFailed)
    assert not isinstance(outcome["error"], FluxKontextBatchFailedNoRetry)


def test_a_finished_batch_or_cancel_on_kill_false_cancels_nothing(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    op = make_op(input_images=str(shots))
    op.execute(make_context(FakeStore()))
    with mock.patch.object(FluxKontextHook, "cancel_prediction") as cancel:
        op.on_kill()
        unkilled = make_op(input_images=str(shots), cancel_on_kill=False)
        unkilled._record = op._record
        unkilled.on_kill()
    cancel.assert_not_called()


@options(prediction_seconds=30.0)
def test_the_deferred_batchs_trigger_cancels_what_is_pending_on_kill(
    emu: FluxKontextEmulator, shots: Path
) -> None:
    with pytest.raises(TaskDeferred) as deferred:
        make_op(input_images=str(shots), deferrable=True).execute(make_context(FakeStore()))
    trigger = deferred.value.trigger
    _, kwargs = trigger.serialize()
    assert kwargs["cancel_on_kill"] is True
    rebuilt = FluxKontextBatchTrigger(**kwargs)
    asyncio.run(FluxKontextBatchTrigger(**{**kwargs, "cancel_on_kill": False}).on_kill())
    assert {emu.prediction(pid).status.value for pid in emu.predictions} <= {"starting", "processing"}
    asyncio.run(rebuilt.on_kill())
    assert {emu.prediction(pid).status.value for pid in emu.predictions} == {"canceled"}


def _until(condition: Any, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
