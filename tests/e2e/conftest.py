"""Provide the end-to-end fixtures: a real Airflow in subprocesses against the emulator on 127.0.0.1.

End-to-end fixtures: a real Airflow (sqlite metadata DB, ``airflow dags test``) in subprocesses
against the emulator serving real HTTP on 127.0.0.1. No HTTP mocks anywhere below this folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "r8_E2E_SECRET_7f3a9c5d"
PREFIX = "/replicate"


@dataclass
class AirflowRun:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Airflow:
    """One ``AIRFLOW_HOME`` (migrated once) whose DAG folder holds the example DAGs."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dags = home / "dags"
        shutil.copytree(ROOT / "example_dags", self.dags)
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("REPLICATE_API_TOKEN", None)
        self.run_cli(["db", "migrate"], check=True)

    def run_cli(
        self, args: list[str], *, env: dict[str, str] | None = None, check: bool = False
    ) -> AirflowRun:
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
        )
        result = AirflowRun(proc.returncode, proc.stdout + proc.stderr)
        if check and not result.ok:
            raise AssertionError(f"airflow {' '.join(args)} failed:\n{result.output[-5000:]}")
        return result

    def dags_test(
        self, dag_id: str, emulator: FluxKontextEmulator, conf: dict[str, Any] | None = None, **extra: Any
    ) -> AirflowRun:
        connection = {
            "conn_type": "fluxkontext",
            "host": emulator.base_url,
            "password": TOKEN,
            "extra": {"backoff_base": 0.2, "backoff_max": 1, "retry_after_max": 2, **extra},
        }
        args = ["dags", "test", dag_id]
        if conf:
            args += ["--conf", json.dumps(conf)]
        return self.run_cli(args, env={"AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection)})


@pytest.fixture(scope="session")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    return Airflow(tmp_path_factory.mktemp("airflow-home"))


@pytest.fixture
def emulator() -> Iterator[FluxKontextEmulator]:
    with FluxKontextEmulator(
        token=TOKEN, path_prefix=PREFIX, prediction_seconds=1.0, start_seconds=0.2, output_scale=0.25
    ) as emu:
        yield emu
