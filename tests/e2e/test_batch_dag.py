"""Test the batch form of the asset pipeline, run for real by ``airflow dags test`` against the emulator.

The batch form of the asset pipeline, run for real by ``airflow dags test`` against the emulator:
twenty images in one task and one deferral, and a retry after a partial failure that edits only the
images that failed.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .conftest import TOKEN, Airflow

pytestmark = pytest.mark.e2e


def _shots(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for number in range(count):
        Image.new("RGB", (64, 64), (number * 12 % 256, 90, 160)).save(folder / f"shot{number:02d}.png")
    return folder


def _tries(airflow: Airflow, dag_id: str, task_id: str) -> list[tuple[str, int]]:
    with sqlite3.connect(airflow.home / "airflow.db") as con:
        return list(
            con.execute(
                "SELECT state, try_number FROM task_instance WHERE dag_id = ? AND task_id = ? ORDER BY id",
                (dag_id, task_id),
            )
        )


def test_batch_pipeline_edits_twenty_images_in_one_task_and_one_deferral(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    shots = _shots(tmp_path / "shots", 20)
    out = tmp_path / "out"
    run = airflow.dags_test(
        "kontext_asset_pipeline_batch", emulator, {"input_dir": str(shots), "output_dir": str(out)}
    )
    assert run.ok, run.output[-4000:]
    assert emulator.created_count == 20  # one prediction per image, none twice
    assert run.output.count("Pausing task as DEFERRED") == 1  # one deferral for the whole batch
    assert "Batch finished: 20 images: 20 succeeded" in run.output
    assert TOKEN not in run.output

    (manifest,) = out.glob("*/manifest.json")
    document = json.loads(manifest.read_text())
    assert document["counts"] == {"succeeded": 20}
    rows = document["images"]
    assert [row["input_name"] for row in rows] == [f"shot{n:02d}.png" for n in range(20)]
    assert {row["prediction"] for row in rows} == set(emulator.predictions)
    for row in rows:
        (path,) = row["outputs"]
        local = Path(path.removeprefix("file://"))
        assert local.name == f"{Path(row['input_name']).stem}-{row['prediction']}.png"
        assert Image.open(local).format == "PNG"
    assert (manifest.parent / "contact_sheet.html").read_text().count("<img") == 20
    with sqlite3.connect(airflow.home / "airflow.db") as con:
        (extra,) = [
            json.loads(extra)
            for (extra,) in con.execute(
                "SELECT extra FROM asset_event WHERE source_dag_id = 'kontext_asset_pipeline_batch'"
            )
        ]
    assert extra["counts"] == {"succeeded": 20}
    assert extra["manifest"].endswith(f"{manifest.parent.name}/manifest.json")


RETRY_DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator

with DAG(
    dag_id="kontext_batch_retry",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    default_args={{"retries": 1, "retry_delay": timedelta(0)}},
):
    FluxKontextBatchEditOperator(
        task_id="edit_all",
        input_images={folder!r},
        prompt="Make it look like a watercolour",
        output_path={out!r},
        poll_interval=0.5,
        deferrable=True,
    )
"""


def test_retry_after_a_partial_failure_edits_only_the_failed_images(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    shots = _shots(tmp_path / "shots", 6)
    out = tmp_path / "out"
    (airflow.dags / "kontext_batch_retry.py").write_text(
        textwrap.dedent(RETRY_DAG.format(folder=str(shots), out=str(out)))
    )
    emulator.faults.abort_predictions(2)  # aborted: never ran, not billed, so a retry may redo them
    run = airflow.dags_test("kontext_batch_retry", emulator)
    assert run.ok, run.output[-4000:]
    assert "2 of 6 images were not edited" in run.output  # the first try's failure, naming them
    assert emulator.created_count == 8  # the retry created only the two aborted ones
    assert _tries(airflow, "kontext_batch_retry", "edit_all")[-1] == ("success", 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"succeeded": 6}
    assert len(list(out.glob("shot*-*.webp"))) == 6  # the model's default format


def test_a_failed_prediction_fails_the_batch_once_keeping_the_others(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    shots = _shots(tmp_path / "shots", 5)
    out = tmp_path / "out"
    emulator.faults.fail_predictions(1, error="the model fell over")
    run = airflow.dags_test(
        "kontext_asset_pipeline_batch", emulator, {"input_dir": str(shots), "output_dir": str(out)}
    )
    assert not run.ok
    assert "1 of 5 images were not edited" in run.output
    assert "the model fell over" in run.output
    assert emulator.created_count == 5  # retries=2, but a failed prediction is not paid for again
    (manifest,) = out.glob("*/manifest.json")
    assert json.loads(manifest.read_text())["counts"] == {"failed": 1, "succeeded": 4}
