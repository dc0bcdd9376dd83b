"""The example DAGs, run for real by ``airflow dags test`` against the emulator."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from airflow_provider_kontext.edits.outputs import safe_stem
from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .conftest import TOKEN, Airflow

pytestmark = pytest.mark.e2e

IMAGES = Path(__file__).resolve().parents[2] / "example_dags" / "images"


def _single_image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mug.png").write_bytes((IMAGES / "mug.png").read_bytes())
    return folder


def test_minimal_dag_edits_one_image(airflow: Airflow, emulator: FluxKontextEmulator) -> None:
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


def _asset_events(airflow: Airflow) -> list[tuple[str | None, int | None, dict[str, Any]]]:
    """Return the example asset's events: (source task, source map index, extra)."""
    with sqlite3.connect(airflow.home / "airflow.db") as con:
        return [
            (task_id, map_index, json.loads(extra))
            for task_id, map_index, extra in con.execute(
                "SELECT e.source_task_id, e.source_map_index, e.extra FROM asset_event e "
                "JOIN asset a ON a.id = e.asset_id WHERE a.uri = ? ORDER BY e.id",
                ("kontext://example/edited-product-shots",),
            )
        ]


def _edit_instances(airflow: Airflow, run_id: str) -> list[tuple[int, str | None, str, int]]:
    """Return the mapped edits of a run: (map index, name shown in the UI, state, try number)."""
    with sqlite3.connect(airflow.home / "airflow.db") as con:
        return list(
            con.execute(
                "SELECT map_index, rendered_map_index, state, try_number FROM task_instance "
                "WHERE dag_id = 'kontext_asset_pipeline' AND task_id = 'edit' AND run_id = ? "
                "ORDER BY map_index",
                (run_id,),
            )
        )


def test_pipeline_persists_every_edit_and_writes_a_manifest(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    events_before = len(_asset_events(airflow))
    run = airflow.dags_test("kontext_asset_pipeline", emulator, {"output_dir": str(out)})
    assert run.ok, run.output[-4000:]
    assert emulator.created_count == 3  # one prediction per mapped task, none twice
    (manifest,) = out.glob("*/manifest.json")
    rows = json.loads(manifest.read_text())
    assert {row["id"] for row in rows} == set(emulator.predictions)
    for row in rows:
        # Traceable: the file is named after its input and its prediction, the row says what made it.
        input_image = Path(row["input_image"])
        assert input_image.parent == airflow.dags / "images"
        assert row["input_name"] == input_image.name
        assert row["prompt"] == "Place the product on a marble table in soft studio light"
        assert row["model"] == "black-forest-labs/flux-kontext-dev"
        assert emulator.predictions[row["id"]].prompt == row["prompt"]
        (path,) = row["outputs"]
        local = Path(path.removeprefix("file://"))
        assert local.name == f"{input_image.stem}-{row['id']}.png"
        assert local.parent == manifest.parent
        image = Image.open(local)
        assert (image.format, image.size) == ("PNG", (256, 256))  # aspect_ratio 1:1
        assert row["status"] == "succeeded"
        assert row["urls_expire_at"]
    assert not list(manifest.parent.glob(".*partial"))
    sheet = (manifest.parent / "contact_sheet.html").read_text()
    assert sheet.count("<img") == 3
    assert all(f"<b>{row['input_name']}</b>" in sheet for row in rows)
    # The folder is the run's own; the mapped edits show their input's name in the UI.
    run_id = next(
        row[0]
        for row in sqlite3.connect(airflow.home / "airflow.db").execute(
            "SELECT run_id FROM dag_run WHERE dag_id = 'kontext_asset_pipeline' ORDER BY id DESC LIMIT 1"
        )
    )
    assert manifest.parent.name == safe_stem(run_id)
    assert [(name, state) for _, name, state, _ in _edit_instances(airflow, run_id)] == [
        ("bottle.png", "success"),
        ("mug.png", "success"),
        ("sneaker.png", "success"),
    ]
    # The log tells the story: the wait, then one summary line; no tqdm dump in the fired event.
    assert run.output.count("Waiting in the triggerer for prediction") == 3
    assert re.search(
        r"Prediction \w+ succeeded in [\d.]+s from mug\.png with seed \d+: 1 output saved to file://",
        run.output,
    )
    assert " is succeeded" not in run.output
    assert TOKEN not in run.output
    db = (airflow.home / "airflow.db").read_bytes()
    assert TOKEN.encode() not in db  # not in XCom, rendered fields, trigger rows or logs
    # One asset event per run, from the manifest task, once the manifest exists.
    (event,) = _asset_events(airflow)[events_before:]
    assert event[:2] == ("write_manifest", -1)
    assert event[2] == {"manifest": str(manifest), "run_id": run_id, "edits": 3}


def test_two_runs_keep_their_edits_apart(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    conf = {"output_dir": str(tmp_path / "out"), "input_dir": str(_single_image_dir(tmp_path))}
    for _ in range(2):
        run = airflow.dags_test("kontext_asset_pipeline", emulator, conf)
        assert run.ok, run.output[-4000:]
    manifests = sorted((tmp_path / "out").glob("*/manifest.json"))
    assert len(manifests) == 2
    ids = [json.loads(manifest.read_text())[0]["id"] for manifest in manifests]
    assert sorted(ids) == sorted(emulator.predictions)
    for manifest, prediction_id in zip(manifests, ids, strict=True):
        assert [p.name for p in manifest.parent.glob("*.png")] == [f"mug-{prediction_id}.png"]


def test_a_refused_token_fails_the_edit_once_although_retries_are_set(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    """The pipeline's tasks have retries=2; a 401 on create would get the same answer every time."""
    connection = {"conn_type": "fluxkontext", "host": emulator.base_url, "password": "r8_wrong_token_e2e"}
    conf = {"output_dir": str(tmp_path / "out"), "input_dir": str(_single_image_dir(tmp_path))}
    run = airflow.run_cli(
        ["dags", "test", "kontext_asset_pipeline", "--conf", json.dumps(conf)],
        env={"AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection)},
    )
    assert "Not retried: the create would get the same answer (the token is refused" in run.output
    creates = [r for r in emulator.requests if r.method == "POST" and r.path.endswith("/predictions")]
    assert [r.status for r in creates] == [401]  # one try, one request
    assert emulator.created_count == 0
    run_id = next(
        row[0]
        for row in sqlite3.connect(airflow.home / "airflow.db").execute(
            "SELECT run_id FROM dag_run WHERE dag_id = 'kontext_asset_pipeline' ORDER BY id DESC LIMIT 1"
        )
    )
    assert _edit_instances(airflow, run_id) == [(0, "mug.png", "failed", 1)]  # try 1 of 3, the last


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
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path, arm: object, expected_creates: int
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
    airflow: Airflow, emulator: FluxKontextEmulator
) -> None:
    emulator.faults.fail_predictions(1, nsfw=True)
    run = airflow.dags_test("kontext_edit_minimal", emulator)
    assert not run.ok or "state=failed" in run.output
    assert "NSFW content detected" in run.output
    assert emulator.created_count == 1


def test_lost_create_response_is_not_retried_into_a_second_prediction(
    airflow: Airflow, emulator: FluxKontextEmulator
) -> None:
    emulator.faults.drop_connection(1, method="POST", path="*/predictions", after_processing=True)
    run = airflow.dags_test("kontext_edit_minimal", emulator)
    assert "may have reached the server" in run.output
    assert emulator.created_count == 1
