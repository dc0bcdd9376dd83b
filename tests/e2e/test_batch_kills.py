"""A batch of edits in a real cluster (scheduler with its LocalExecutor workers, dag-processor,
api-server, triggerer as separate processes): the worker is killed while it creates, the triggerer
while it waits. Every image must be edited exactly once."""

from __future__ import annotations

import base64
import hashlib
import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from airflow_provider_kontext.testing.emulator import KontextEmulator

from .cluster import Cluster, cluster_env
from .conftest import TOKEN

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

DAG_ID = "kontext_batch_kills"
IMAGES = 20

DAG = f'''
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator

with DAG(
    dag_id="{DAG_ID}",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    default_args={{"retries": 3, "retry_delay": timedelta(0)}},
):
    FluxKontextBatchEditOperator(
        task_id="edit_all",
        input_images="{{{{ dag_run.conf['input_dir'] }}}}",
        prompt="Make it look like a watercolour",
        output_path="{{{{ dag_run.conf['output_dir'] }}}}",
        creates_per_minute=60,  # one a second: the kill lands while the worker creates
        max_concurrent_creates=2,
        poll_interval=1.0,
        deferrable=True,
    )
'''


@pytest.fixture
def emu() -> Iterator[KontextEmulator]:
    with KontextEmulator(
        token=TOKEN, prediction_seconds=20.0, start_seconds=0.5, output_scale=0.1
    ) as emulator:
        yield emulator


@pytest.fixture
def cluster(tmp_path: Path, emu: KontextEmulator) -> Iterator[Cluster]:
    home = tmp_path / "home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    (dags / f"{DAG_ID}.py").write_text(textwrap.dedent(DAG))
    connection = {"conn_type": "fluxkontext", "host": emu.base_url, "password": TOKEN}
    env = cluster_env(
        home,
        dags,
        {"flux_kontext_default": connection},
        # A killed worker's task is noticed (and retried) soon, not after five minutes.
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
    )
    c = Cluster(home, env)
    c.cli("db", "migrate")
    try:
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            c.start(name)
        yield c
    finally:
        c.stop_all()


def _image_digests(emu: KontextEmulator) -> list[str]:
    """The digest of each created prediction's input image."""
    digests = []
    for prediction_id in emu.predictions:
        sent = str((emu.prediction(prediction_id).input or {})["input_image"])
        digests.append(hashlib.sha256(base64.b64decode(sent.partition(",")[2])).hexdigest())
    return digests


def _state(cluster: Cluster) -> str | None:
    rows = cluster.query("select state from dag_run where dag_id = ? order by id desc limit 1", DAG_ID)
    return str(rows[0][0]) if rows else None


def test_killed_worker_and_triggerer_leave_every_image_edited_once(
    cluster: Cluster, emu: KontextEmulator, tmp_path: Path
) -> None:
    shots = tmp_path / "shots"
    shots.mkdir()
    expected = set()
    for number in range(IMAGES):
        path = shots / f"shot{number:02d}.png"
        Image.new("RGB", (48, 48), (number * 11, 40, 200)).save(path)
        expected.add(hashlib.sha256(path.read_bytes()).hexdigest())
    out = tmp_path / "out"
    cluster.wait_for(
        "the DAG to be parsed", lambda: DAG_ID in cluster.cli("dags", "list", "-o", "plain"), 180
    )
    conf = {"input_dir": str(shots), "output_dir": str(out)}
    cluster.cli("dags", "trigger", DAG_ID, "--conf", json.dumps(conf))

    # The worker (a child of the scheduler, in its process group) dies in the middle of the creates.
    cluster.wait_for("some creates", lambda: emu.created_count >= 5, 240)
    cluster.kill("scheduler")
    killed_at = emu.created_count
    assert killed_at < IMAGES
    time.sleep(2)
    cluster.start("scheduler")

    # The retry finishes the creates and defers; the triggerer dies while it waits.
    cluster.wait_for("the batch to be deferred", lambda: cluster.deferred(DAG_ID, "edit_all") == 1, 300)
    cluster.kill("triggerer")
    time.sleep(2)
    cluster.start("triggerer")

    cluster.wait_for("the run to end", lambda: _state(cluster) in ("success", "failed"), 400)
    assert _state(cluster) == "success"
    digests = _image_digests(emu)
    assert sorted(digests) == sorted(expected)  # every image edited, none twice
    assert emu.created_count == IMAGES
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"succeeded": IMAGES}
    tries = cluster.query(
        "select try_number from task_instance where dag_id = ? and task_id = 'edit_all'", DAG_ID
    )
    assert tries[0][0] >= 2  # the kill cost a try, not an edit
