"""Run Airflow's components as separate processes (LocalExecutor on sqlite) for the end-to-end tests.

The Airflow components as separate processes (LocalExecutor on sqlite), shared by the end-to-end
tests that need a real scheduler and triggerer rather than ``airflow dags test``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: A status read: one prediction (``GET /v1/predictions/<id>``) or the shared watcher's sweep of the
#: account's list (``GET /v1/predictions``), which answers for many waits at once.
STATUS_READ = re.compile(r"/v1/predictions(/[a-z0-9]+)?$")


def status_reads(requests: list[Any]) -> int:
    """How many of the emulator's recorded ``requests`` read a prediction's status."""
    return sum(1 for r in requests if r.method == "GET" and STATUS_READ.search(r.path))


def cluster_env(
    home: Path, dags: Path, connections: dict[str, dict[str, Any]], **config: str
) -> dict[str, str]:
    """Return the environment of a cluster's processes.

    The environment of a cluster's processes: this one's, with ``AIRFLOW_HOME`` at ``home``, a
    LocalExecutor on sqlite with fast heartbeats, an api-server on a free loopback port, a
    connection per ``connections`` entry (``AIRFLOW_CONN_<NAME>``), and ``config`` on top
    (``AIRFLOW__...`` settings or any other variable).
    """
    port = free_port()
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
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **{f"AIRFLOW_CONN_{name.upper()}": json.dumps(fields) for name, fields in connections.items()},
        **config,
    }
    env.pop("REPLICATE_API_TOKEN", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """The Airflow components as separate processes, so the triggerer can be killed alone."""

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

    def start(self, name: str, *command: str, env: dict[str, str] | None = None) -> None:
        """Start ``airflow <command>`` as the process called ``name``.

        Start ``airflow <command>`` (default ``airflow <name>``) as the process called ``name``,
        with ``env`` on top of the cluster's (several workers or triggerers need their own).
        """
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", *(command or (name,))],
            env={**self.env, **(env or {})},
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

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.home / "airflow.db", timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # not migrated yet, or locked: ask again later
            return []
        finally:
            db.close()

    def deferred(self, dag_id: str, task_id: str) -> int:
        """How many of ``task_id``'s task instances are deferred right now."""
        rows = self.query(
            "select count(*) from task_instance where dag_id = ? and task_id = ? and state = 'deferred'",
            dag_id,
            task_id,
        )
        return int(rows[0][0]) if rows else 0

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        tails = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )
        raise AssertionError(f"timed out waiting for {what}\n{tails}")
