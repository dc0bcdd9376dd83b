"""The example DAGs, run for real by ``airflow dags test`` against the emulator."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
import requests
from PIL import Image

from airflow_provider_kontext.testing.emulator import KontextEmulator

from .conftest import TOKEN, Airflow

pytestmark = pytest.mark.e2e

IMAGES = Path(__file__).resolve().parents[2] / "example_dags" / "images"


def _single_image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mug.png").write_bytes((IMAGES / "mug.png").read_bytes())
    return folder


def test_minimal_dag_edits_one_image(airflow: Airflow, emulator: KontextEmulator) -> None:
    run = airflow.dags_test("kontext_edit_minimal", emulator)
    assert run.ok, run.output[-4000:]
    assert emulator.created_count == 1
    (prediction,) = emulator.predictions.values()
    record = emulator.prediction(prediction.id)
    assert record.status.value == "succeeded"
    (url,) = record.output_urls
    image = Image.open(io.BytesIO(requests.get(url, timeout=10).content))
    assert image.format == "PNG"
    assert image.size == (256, 256)  # match_input_image of a square input: 1024x1024, times 0.25
    assert "Pausing task as DEFERRED" in run.output
    assert TOKEN not in run.output


def test_pipeline_persists_every_edit_and_writes_a_manifest(
    airflow: Airflow, emulator: KontextEmulator, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = airflow.dags_test("kontext_asset_pipeline", emulator, {"output_dir": str(out)})
    assert run.ok, run.output[-4000:]
    assert emulator.created_count == 3  # one prediction per mapped task, none twice
    (manifest,) = out.glob("*/manifest.json")
    rows = json.loads(manifest.read_text())
    assert {row["id"] for row in rows} == set(emulator.predictions)
    for row in rows:
        (path,) = row["outputs"]
        local = Path(path.removeprefix("file://"))
        assert local.parent == manifest.parent
        image = Image.open(local)
        assert (image.format, image.size) == ("PNG", (256, 256))  # aspect_ratio 1:1
        assert row["status"] == "succeeded"
        assert row["urls_expire_at"]
    assert not list(manifest.parent.glob(".*partial"))
    assert (manifest.parent / "contact_sheet.html").read_text().count("<img") == 3
    assert TOKEN not in run.output
    db = (airflow.home / "airflow.db").read_bytes()
    assert TOKEN.encode() not in db  # not in XCom, rendered fields, trigger rows or logs
    with sqlite3.connect(airflow.home / "airflow.db") as con:
        extras = [
            json.loads(extra)
            for (extra,) in con.execute(
                "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = ?",
                ("kontext://example/edited-product-shots",),
            )
        ]
    saved = {path for row in rows for path in row["outputs"]}
    assert saved <= {path for extra in extras for path in extra["outputs"]}  # one event per mapped edit


@pytest.mark.parametrize(
    ("arm", "expected_creates"),
    [
        pytest.param(lambda f: f.throttle(2, method="POST", path="*/predictions"), 1, id="429-on-create"),
        pytest.param(
            lambda f: f.throttle(2, method="POST", path="*/predictions", retry_after=1),
            1,
            id="429-retry-after",
        ),
        pytest.param(lambda f: f.server_error(3, method="GET", status=503), 1, id="503-on-poll"),
        pytest.param(lambda f: f.server_error(2, method="GET", html=True, status=502), 1, id="502-html-poll"),
        pytest.param(lambda f: f.drop_connection(2, method="GET"), 1, id="reset-on-poll"),
        pytest.param(lambda f: f.slow(0.5, 3, method="GET"), 1, id="slow-poll"),
        pytest.param(lambda f: f.images_api_shape(1), 1, id="images-api-shape"),
    ],
)
def test_faults_that_end_in_success(
    airflow: Airflow, emulator: KontextEmulator, tmp_path: Path, arm: object, expected_creates: int
) -> None:
    arm(emulator.faults)  # type: ignore[operator]
    conf = {"output_dir": str(tmp_path / "out"), "input_dir": str(_single_image_dir(tmp_path))}
    run = airflow.dags_test("kontext_asset_pipeline", emulator, conf)
    assert run.ok, run.output[-4000:]
    assert emulator.created_count == expected_creates
    (manifest,) = (tmp_path / "out").glob("*/manifest.json")
    (row,) = json.loads(manifest.read_text())
    assert Image.open(Path(row["outputs"][0].removeprefix("file://"))).format == "PNG"


def test_nsfw_failure_fails_the_task_with_the_models_message(
    airflow: Airflow, emulator: KontextEmulator
) -> None:
    emulator.faults.fail_predictions(1, nsfw=True)
    run = airflow.dags_test("kontext_edit_minimal", emulator)
    assert not run.ok or "state=failed" in run.output
    assert "NSFW content detected" in run.output
    assert emulator.created_count == 1


def test_lost_create_response_is_not_retried_into_a_second_prediction(
    airflow: Airflow, emulator: KontextEmulator
) -> None:
    emulator.faults.drop_connection(1, method="POST", path="*/predictions", after_processing=True)
    run = airflow.dags_test("kontext_edit_minimal", emulator)
    assert "may have reached the server" in run.output
    assert emulator.created_count == 1
