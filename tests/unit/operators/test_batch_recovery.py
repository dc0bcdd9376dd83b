"""Test how ``FluxKontextBatchEditOperator`` recovers lost creates and what it does when killed.

Against the emulator (real HTTP on 127.0.0.1): a lost create is adopted by the single edit's search
(exactly one match, never one recorded for another image) and an ambiguous one is created anew;
``on_kill`` cancels what the batch still waits for and keeps what succeeded.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from emulated import png

from airflow_provider_kontext.edits.batch_ledger import CREATING, BatchLedger
from airflow_provider_kontext.exceptions import FluxKontextBatchFailed, FluxKontextPredictionMayExistError
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.testing import FluxKontextEmulator
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
