"""Test load: many mapped edits through one DAG run while the emulator answers 429 to a share of requests.

Load: many mapped edits through one DAG run while the emulator answers 429 to a share of all
requests (creates and polls). Nothing may be lost, nothing duplicated, and every task must end in
success or a clear failure.

``test_mapped_edits_under_throttling`` (in the default suite) maps ``KONTEXT_LOAD_SMALL`` edits (40).
``test_2000_mapped_edits_under_throttling`` is marked ``load`` (excluded by default) and maps
``KONTEXT_LOAD_EDITS`` (2000); run it with::

    .venv/bin/python -m pytest -m load tests/e2e/test_load.py -s

Both run ``airflow dags test`` in one subprocess: tasks run one after another in that process, each
deferring and its trigger running in line, which here is faster than a scheduler with a LocalExecutor
(whose per-task process start-up dominates on 2 cores; see docs/hardening.md). Half of
the edits defer to the trigger; the other half use ``wait_seconds`` and finish within the create.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_kontext.testing import faults
from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .conftest import ROOT, Airflow

pytestmark = pytest.mark.e2e

TOKEN = "r8_LoadE2E_7a0c3b19"
DAG_ID = "kontext_load"
THROTTLED_SHARE = 0.25

LOAD_DAG = """
from airflow.sdk import DAG
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

IMAGE = {image!r}
EDITS = {edits}

with DAG(dag_id="{dag_id}", schedule=None, catchup=False, default_args={{"retries": 0}},
         max_active_tasks=EDITS):
    FluxKontextEditOperator.partial(
        task_id="edit", input_image=IMAGE, output_format="png", poll_interval=0.05,
        max_active_tis_per_dag=None,
    ).expand_kwargs(
        [{{"prompt": f"load edit {{i}}", "wait_seconds": None if i % 2 else 5}} for i in range(EDITS)]
    )
"""


def run_load(home: Path, edits: int, timeout: float) -> dict[str, Any]:
    airflow = Airflow(home)
    png = (ROOT / "example_dags" / "images" / "mug.png").read_bytes()
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    (airflow.dags / f"{DAG_ID}.py").write_text(LOAD_DAG.format(image=image, edits=edits, dag_id=DAG_ID))
    with FluxKontextEmulator(
        token=TOKEN, prediction_seconds=0.05, start_seconds=0.0, output_scale=0.05, fault_seed=7
    ) as emu:
        emu.faults.throttle(probability=THROTTLED_SHARE, path=faults.ANY, available_in=0.01)
        connection = {
            "conn_type": "fluxkontext",
            "host": emu.base_url,
            "password": TOKEN,
            "extra": {"max_retries": 12, "backoff_base": 0.01, "backoff_max": 0.05, "retry_after_max": 0.05},
        }
        env = {
            **airflow.env,
            "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection),
            "AIRFLOW__CORE__MAX_MAP_LENGTH": str(max(1024, edits)),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", DAG_ID],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        elapsed = time.monotonic() - started
        predictions = {pid: record.prompt for pid, record in emu.predictions.items()}
        answers = Counter(r.status for r in emu.requests)
        created = emu.created_count
    db = sqlite3.connect(home / "airflow.db")
    try:
        tis = db.execute(
            "select map_index, state from task_instance where dag_id = ? and task_id = 'edit'", (DAG_ID,)
        ).fetchall()
        xcom = {
            (map_index, key): json.loads(value)
            for map_index, key, value in db.execute(
                "select map_index, key, value from xcom where dag_id = ? and task_id = 'edit'", (DAG_ID,)
            )
        }
    finally:
        db.close()
    return {
        "output": proc.stdout + proc.stderr,
        "elapsed": elapsed,
        "tis": dict(tis),
        "xcom": xcom,
        "predictions": predictions,
        "answers": answers,
        "created": created,
    }


def check(result: dict[str, Any], edits: int) -> None:
    tis, xcom, predictions = result["tis"], result["xcom"], result["predictions"]
    answers: Counter[int | None] = result["answers"]
    tail = result["output"][-4000:]
    # Every mapped task exists and ended: success, or a failure (none stuck, none skipped).
    assert sorted(tis) == list(range(edits)), tail
    states = Counter(tis.values())
    assert set(states) <= {"success", "failed"}, (states, tail)
    failed = [i for i, state in tis.items() if state == "failed"]
    # With 12 retries a 25 % share of 429s is survived: a failure is a rare exhaustion, not a pattern.
    assert len(failed) <= max(1, edits // 100), (len(failed), tail)
    if failed:  # a clear failure says why, in the task's log
        assert result["output"].count("Task failed with exception") >= len(failed), tail
        assert "Kontext" in result["output"] or "Prediction" in result["output"], tail
    # Nothing duplicated: one prediction per prompt, as many as were created, none created twice.
    prompts = Counter(predictions.values())
    assert all(count == 1 for count in prompts.values()), [p for p, c in prompts.items() if c > 1]
    assert result["created"] == len(predictions)
    # Nothing lost: each successful task points at the prediction made for its own prompt, and
    # returned its output.
    for i, state in tis.items():
        if state != "success":
            continue
        prediction_id = xcom.get((i, "prediction_id"))
        assert predictions.get(prediction_id) == f"load edit {i}", (i, prediction_id)
        assert xcom.get((i, "return_value")), i
        assert xcom[(i, "prediction")]["id"] == prediction_id
    assert states["success"] + len(failed) == edits
    assert len(predictions) >= states["success"]
    # The emulator really throttled a share of all requests.
    total = sum(answers.values())
    assert answers[429] >= 0.15 * total, answers
    print(
        f"\n{edits} mapped edits in {result['elapsed']:.0f} s: {dict(states)}; "
        f"{len(predictions)} predictions created; requests {total}, answers {dict(answers)}"
    )


def test_mapped_edits_under_throttling(tmp_path: Path) -> None:
    edits = int(os.environ.get("KONTEXT_LOAD_SMALL", "40"))
    check(run_load(tmp_path / "home", edits, timeout=600), edits)


@pytest.mark.load
@pytest.mark.timeout(4 * 3600)
def test_2000_mapped_edits_under_throttling(tmp_path: Path) -> None:
    edits = int(os.environ.get("KONTEXT_LOAD_EDITS", "2000"))
    check(run_load(tmp_path / "home", edits, timeout=4 * 3600), edits)
