"""Test a triggerer killed and started again while the asset pipeline's edits are deferred.

A real scheduler, dag-processor, api-server and triggerer (LocalExecutor, sqlite) run the asset
pipeline; the triggerer is killed while the edits are deferred and started again. The run must
succeed with exactly one prediction per mapped task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env, status_reads
from .conftest import ROOT, TOKEN

pytestmark = pytest.mark.e2e

DAG_ID = "kontext_pipeline_manual"


@pytest.fixture
def cluster(tmp_path: Path, emulator_slow: FluxKontextEmulator) -> Iterator[Cluster]:
    home = tmp_path / "home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    (dags / "images").mkdir()
    for image in (ROOT / "example_dags" / "images").iterdir():
        (dags / "images" / image.name).write_bytes(image.read_bytes())
    source = (ROOT / "example_dags" / "kontext_asset_pipeline.py").read_text()
    source = source.replace('dag_id="kontext_asset_pipeline"', f'dag_id="{DAG_ID}"')
    source = source.replace(
        'schedule=CronTriggerTimetable("0 3 * * *", timezone="UTC", run_immediately=timedelta(0))',
        "schedule=None",
    )
    assert DAG_ID in source
    assert "schedule=None" in source
    (dags / f"{DAG_ID}.py").write_text(source)
    connection = {
        "conn_type": "fluxkontext",
        "host": emulator_slow.base_url,
        "password": TOKEN,
        "extra": {"backoff_base": 0.2, "backoff_max": 1},
    }
    env = cluster_env(home, dags, {"flux_kontext_default": connection})
    c = Cluster(home, env)
    c.cli("db", "migrate")
    try:
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            c.start(name)
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def emulator_slow() -> Iterator[FluxKontextEmulator]:
    # 30 s: the kill must find the edits still running, on a busy machine too.
    with FluxKontextEmulator(
        token=TOKEN, prediction_seconds=30.0, start_seconds=0.5, output_scale=0.25
    ) as emu:
        yield emu


def test_run_survives_a_triggerer_kill_with_one_prediction_per_task(
    cluster: Cluster, emulator_slow: FluxKontextEmulator, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    emu = emulator_slow
    cluster.wait_for(
        "the DAG to be parsed", lambda: DAG_ID in cluster.cli("dags", "list", "-o", "plain"), 120
    )
    cluster.cli("dags", "trigger", DAG_ID, "--conf", json.dumps({"output_dir": str(out)}))

    reads_when_deferred: list[int] = []

    def all_polled() -> bool:
        # The three edits are in the triggerer, and it has read their status since (one prediction
        # at a time or, with several waits, through the account's list).
        if not reads_when_deferred:
            if len(emu.predictions) == 3 and cluster.deferred(DAG_ID, "edit") == 3:
                reads_when_deferred.append(status_reads(emu.requests))
            return False
        return status_reads(emu.requests) > reads_when_deferred[0]

    cluster.wait_for("three deferred edits being polled", all_polled, 180)
    cluster.kill("triggerer")
    polls_before = len(emu.requests)
    time.sleep(2)
    cluster.start("triggerer")
    cluster.wait_for("the manifest", lambda: any(out.glob("*/manifest.json")), 240)

    assert emu.created_count == 3
    assert len(emu.requests) > polls_before  # the restarted triggerer resumed polling
    (manifest,) = out.glob("*/manifest.json")
    rows = json.loads(manifest.read_text())
    assert sorted(row["id"] for row in rows) == sorted(emu.predictions)
    assert all(emu.prediction(pid).status.value == "succeeded" for pid in emu.predictions)
