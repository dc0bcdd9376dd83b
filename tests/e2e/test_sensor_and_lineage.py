"""Test the sensor's example DAG and an edit's OpenLineage events, run for real by ``airflow dags test``.

The sensor's example DAG and the OpenLineage events of an edit, run for real by ``airflow dags test``
against the emulator (OpenLineage's console transport writes the events into the task log).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .conftest import TOKEN, Airflow

pytestmark = pytest.mark.e2e

CONSOLE = {"AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "console"})}


def _xcom(airflow: Airflow, task_id: str, key: str) -> Any:
    with sqlite3.connect(airflow.home / "airflow.db") as con:
        rows = con.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ? ORDER BY timestamp DESC",
            ("kontext_sensor", task_id, key),
        ).fetchall()
    value = rows[0][0]
    return json.loads(value if isinstance(value, str) else value.decode())


def _conn_env(emulator: FluxKontextEmulator) -> dict[str, str]:
    connection = {"conn_type": "fluxkontext", "host": emulator.base_url, "password": TOKEN}
    return {"AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection)}


def _run_sensor_dag(airflow: Airflow, emulator: FluxKontextEmulator, out: Path, deferrable: str) -> str:
    run = airflow.run_cli(
        ["dags", "test", "kontext_sensor", "--conf", json.dumps({"output_dir": str(out)})],
        env={**_conn_env(emulator), "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": deferrable},
    )
    assert run.ok, run.output[-4000:]
    return run.output


@pytest.mark.parametrize("deferrable", ["True", "False"])
def test_sensor_waits_for_a_prediction_started_by_another_task(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path, deferrable: str
) -> None:
    out = tmp_path / "out"
    output = _run_sensor_dag(airflow, emulator, out, deferrable)
    assert emulator.created_count == 1  # started once, by start_edit; the sensor only reads
    (prediction_id,) = emulator.predictions
    (saved,) = out.glob("*.png")
    assert Image.open(saved).format == "PNG"
    # Deferred to the triggerer when Airflow's default_deferrable says so, else poked in the worker.
    assert ("Pausing task as DEFERRED" in output) is (deferrable == "True")
    summary = _xcom(airflow, "wait_for_edit", "prediction")
    assert summary["id"] == prediction_id
    assert summary["status"] == "succeeded"
    assert summary["outputs"] == [saved.as_uri()]
    assert _xcom(airflow, "wait_for_edit", "return_value") == [saved.as_uri()]
    assert TOKEN not in output


def _lineage_events(output: str) -> list[dict[str, Any]]:
    """Return the OpenLineage events the console transport logged (one JSON document per event)."""
    events = []
    decoder = json.JSONDecoder()
    for match in re.finditer(r'\{"eventTime"|\{\s*"eventTime"', output):
        try:
            event, _ = decoder.raw_decode(output, match.start())
        except json.JSONDecodeError:
            continue
        events.append(event)
    return events


def _complete(events: list[dict[str, Any]], job_suffix: str) -> dict[str, Any]:
    (event,) = [e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith(job_suffix)]
    return event


def test_operator_and_sensor_emit_lineage_with_the_console_transport(
    airflow: Airflow, emulator: FluxKontextEmulator, tmp_path: Path
) -> None:
    run = airflow.run_cli(["dags", "test", "kontext_edit_minimal"], env={**_conn_env(emulator), **CONSOLE})
    assert run.ok, run.output[-4000:]
    event = _complete(_lineage_events(run.output), ".edit")
    (prediction_id,) = emulator.predictions
    image = airflow.dags / "images" / "mug.png"
    assert [(d["namespace"].split("://")[0], d["name"]) for d in event["inputs"]] == [("file", str(image))]
    (output,) = event["outputs"]
    assert output["namespace"] == emulator.base_url.split("/replicate")[0]  # http://127.0.0.1:<port>
    assert prediction_id in output["name"]
    facet = event["run"]["facets"]["fluxKontextPrediction"]
    assert facet["predictionId"] == prediction_id
    assert facet["model"] == "black-forest-labs/flux-kontext-dev"
    assert facet["predictTime"] > 0
    assert TOKEN not in run.output

    out = tmp_path / "out"
    run = airflow.run_cli(
        ["dags", "test", "kontext_sensor", "--conf", json.dumps({"output_dir": str(out)})],
        env={**_conn_env(emulator), **CONSOLE},
    )
    assert run.ok, run.output[-4000:]
    event = _complete(_lineage_events(run.output), ".wait_for_edit")
    (saved,) = out.glob("*.png")
    assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
        (event["outputs"][0]["namespace"], str(saved))
    ]
    assert event["outputs"][0]["namespace"].startswith("file://")
    (uploaded,) = event["inputs"]  # the uploaded image the prediction read, by its URL
    assert uploaded["namespace"].startswith("http://127.0.0.1:")
    assert "/files/" in uploaded["name"]
    assert event["run"]["facets"]["fluxKontextPrediction"]["status"] == "succeeded"
    assert TOKEN not in run.output
