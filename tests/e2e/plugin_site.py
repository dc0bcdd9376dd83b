"""Serve a real Airflow API server with the provider's plugin for the plugin's end-to-end tests.

A real Airflow API server with the provider's plugin, for the plugin's end-to-end tests: the
example pipeline run once against the emulator (three edits saved to files), two users (``alice``
reads every DAG; ``bob`` only ``kontext_sensor``, decided by an auth manager that decides per DAG,
``authz/kontext_test_auth.py``), and a run of many synthetic edits for the gallery's paging.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"alice": "alice-e2e-pw", "bob": "bob-e2e-pw"}
PIPELINE = "kontext_asset_pipeline"


@dataclass
class Site:
    """The running API server and what the tests look at."""

    cluster: Cluster
    base: str
    run_id: str
    edits_dir: Path

    def token(self, user: str) -> str:
        answer = requests.post(
            f"{self.base}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def session(self, user: str | None) -> requests.Session:
        """Return a client with ``user``'s session cookie, as the UI's browser has it (none: anonymous)."""
        client = requests.Session()
        if user:
            client.cookies.set("_token", self.token(user))
        return client


def start_site(home: Path, emulator: FluxKontextEmulator) -> Site:
    """Run the pipeline once with ``airflow dags test``, then start the API server alone."""
    dags = home / "dags"
    shutil.copytree(ROOT / "example_dags", dags)
    (home / "passwords.json").write_text(json.dumps(PASSWORDS))
    env = cluster_env(
        home,
        dags,
        {"flux_kontext_default": {"conn_type": "fluxkontext", "host": emulator.base_url}},
        AIRFLOW__CORE__AUTH_MANAGER="kontext_test_auth.PerDagAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="alice:viewer,bob:viewer",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE="True",
        PYTHONPATH=str(Path(__file__).parent / "authz"),
        KONTEXT_TEST_BOB_DAGS="kontext_sensor",
    )
    cluster = Cluster(home, env)
    cluster.cli("db", "migrate")
    edits_dir = home / "edits"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "airflow",
            "dags",
            "test",
            PIPELINE,
            "--conf",
            json.dumps({"output_dir": str(edits_dir)}),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    (run_id,) = cluster.query("select run_id from dag_run where dag_id = ?", PIPELINE)[0]
    cluster.start("api-server")
    base = f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/api/v2/version", timeout=2).status_code in (200, 401)
        except requests.RequestException:
            return False

    cluster.wait_for("the API server", up, 180)
    return Site(cluster, base, str(run_id), edits_dir)


def add_synthetic_run(
    site: Site, run_id: str, count: int, image: Path, source: Path, *, thumbnails: bool = False
) -> None:
    """Add a run of ``count`` mapped edits whose records copy the pipeline's first edit.

    Each names its own copy of ``source`` as input and of ``image`` as output (what the gallery
    reads: XComs and task instances), so no two thumbnails share a cache entry. ``thumbnails``:
    also write the thumbnails a task writes when it saves its outputs (``edits/thumbnails.py``).
    """
    from airflow_provider_kontext.edits.thumbnails import write_thumbnails

    db = sqlite3.connect(site.cluster.home / "airflow.db", timeout=30)
    try:
        cols = [r[1] for r in db.execute("pragma table_info(dag_run)")]
        row = dict(zip(cols, db.execute("select * from dag_run where run_id = ?", (site.run_id,)).fetchone()))
        row.update(id=None, run_id=run_id, logical_date=None)
        row = {k: v for k, v in row.items() if k != "id"}
        db.execute(
            f"insert into dag_run ({','.join(row)}) values ({','.join('?' * len(row))})", list(row.values())
        )
        (dag_run_id,) = db.execute("select id from dag_run where run_id = ?", (run_id,)).fetchone()
        ti_cols = [r[1] for r in db.execute("pragma table_info(task_instance)")]
        template = dict(
            zip(
                ti_cols,
                db.execute(
                    "select * from task_instance where run_id = ? and task_id = 'edit' limit 1",
                    (site.run_id,),
                ).fetchone(),
            )
        )
        (summary_text,) = db.execute(
            "select value from xcom where run_id = ? and task_id = 'edit' and key = 'prediction' limit 1",
            (site.run_id,),
        ).fetchone()
        summary: dict[str, Any] = json.loads(summary_text)
        folder = site.edits_dir / run_id
        folder.mkdir(parents=True, exist_ok=True)
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        for index in range(count):
            out = folder / f"shot{index:04d}-edit.png"
            shutil.copyfile(image, out)
            given = folder / f"shot{index:04d}.png"
            shutil.copyfile(source, given)
            if thumbnails:
                write_thumbnails([out.as_uri()], str(given), print)
            ti = {
                **template,
                "run_id": run_id,
                "map_index": index,
                "rendered_map_index": f"shot{index:04d}.png",
            }
            ti["id"] = str(uuid.uuid4())  # unique across synthetic runs
            db.execute(
                f"insert into task_instance ({','.join(ti)}) values ({','.join('?' * len(ti))})",
                list(ti.values()),
            )
            record = {
                **summary,
                "id": f"synthetic{index}",
                "outputs": [out.as_uri()],
                "input_image": str(given),
                "input_name": given.name,
            }
            db.execute(
                "insert into xcom (dag_run_id, task_id, map_index, key, dag_id, run_id, value, timestamp) "
                "values (?, 'edit', ?, 'prediction', ?, ?, ?, ?)",
                (dag_run_id, index, PIPELINE, run_id, json.dumps(record), now),
            )
        db.commit()
    finally:
        db.close()
