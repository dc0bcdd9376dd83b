"""A real scheduler, dag-processor, api-server and triggerer (LocalExecutor, sqlite) run the asset
pipeline; the triggerer is killed while the edits are deferred and started again. The run must
succeed with exactly one prediction per mapped task."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airflow_provider_kontext.testing.emulator import KontextEmulator

from .conftest import ROOT, TOKEN

pytestmark = pytest.mark.e2e

DAG_ID = "kontext_pipeline_manual"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(what: str, check: Callable[[], bool], timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log"))
    )
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


class Cluster:
    """The Airflow components as separate processes, so one can be killed alone."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = home / "proc-logs"
        self.logs.mkdir()

    def cli(self, *args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def start(self, name: str) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", name],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path, emulator_slow: KontextEmulator) -> Iterator[Cluster]:
    home = tmp_path / "home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    (dags / "images").mkdir()
    for image in (ROOT / "example_dags" / "images").iterdir():
        (dags / "images" / image.name).write_bytes(image.read_bytes())
    source = (ROOT / "example_dags" / "kontext_asset_pipeline.py").read_text()
    source = source.replace('dag_id="kontext_asset_pipeline"', f'dag_id="{DAG_ID}"')
    source = source.replace('schedule="@daily"', "schedule=None")
    assert DAG_ID in source
    assert "schedule=None" in source
    (dags / f"{DAG_ID}.py").write_text(source)
    port = _free_port()
    connection = {
        "conn_type": "flux_kontext",
        "host": emulator_slow.base_url,
        "password": TOKEN,
        "extra": {"backoff_base": 0.2, "backoff_max": 1},
    }
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "e2e-jwt-secret-for-this-test-only",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("REPLICATE_API_TOKEN", None)
    c = Cluster(home, env)
    c.cli("db", "migrate")
    try:
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            c.start(name)
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def emulator_slow() -> Iterator[KontextEmulator]:
    with KontextEmulator(token=TOKEN, prediction_seconds=12.0, start_seconds=0.5, output_scale=0.25) as emu:
        yield emu


def test_run_survives_a_triggerer_kill_with_one_prediction_per_task(
    cluster: Cluster, emulator_slow: KontextEmulator, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    emu = emulator_slow
    _wait_for(
        "the DAG to be parsed",
        lambda: DAG_ID in cluster.cli("dags", "list", "-o", "plain"),
        120,
        cluster.logs,
    )
    cluster.cli("dags", "trigger", DAG_ID, "--conf", json.dumps({"output_dir": str(out)}))

    def all_polled() -> bool:
        polled = {m.group(1) for r in emu.requests if (m := re.search(r"/v1/predictions/(\w+)$", r.path))}
        return len(emu.predictions) == 3 and set(emu.predictions) <= polled

    _wait_for("three deferred edits being polled", all_polled, 180, cluster.logs)
    cluster.kill("triggerer")
    polls_before = len(emu.requests)
    time.sleep(2)
    cluster.start("triggerer")
    _wait_for("the manifest", lambda: any(out.glob("*/manifest.json")), 240, cluster.logs)

    assert emu.created_count == 3
    assert len(emu.requests) > polls_before  # the restarted triggerer resumed polling
    (manifest,) = out.glob("*/manifest.json")
    rows = json.loads(manifest.read_text())
    assert sorted(row["id"] for row in rows) == sorted(emu.predictions)
    assert all(emu.prediction(pid).status.value == "succeeded" for pid in emu.predictions)
