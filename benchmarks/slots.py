"""Scenario 2: seconds a worker slot is held per edit, by the deferrable operator, the operator
waiting in the worker, and a ``PythonOperator`` running ``replicate.run``, each over the same batch
of emulated edits in a real ``dag.test()`` (``airflow dags test``), for a short and a long model run.

Method: the DAGs (``benchmarks/dags/kontext_bench_slots.py``) subclass the operator to time its own
worker phases (``execute``, plus ``execute_complete`` after a deferral) and wrap the replicate call
the same way. Each ``airflow dags test`` runs in a fresh ``AIRFLOW_HOME`` with a migrated sqlite DB
and the DAG file in its DAG folder; the three variants of one model duration run at the same time.
As a cross-check, the task runner's own segments (from "[DAG TEST] running task" to the task's
deferral or end) are read from the ``dag.test`` log.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, PYTHON, TINY_PNG, EmulatorProcess, child_env, connection_json

VARIANTS = {
    "kontext_bench_deferrable": "FluxKontextEditOperator (deferrable, default)",
    "kontext_bench_in_worker": "FluxKontextEditOperator(deferrable=False)",
    "kontext_bench_replicate": "PythonOperator + replicate.run",
}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z)")


@dataclass
class SlotResult:
    dag_id: str
    prediction_seconds: float
    edits: int
    ok: bool
    operator_seconds: list[float] = field(default_factory=list)  # per edit: execute (+ execute_complete)
    segment_seconds: list[float] = field(default_factory=list)  # per edit: task-runner segments
    segments_per_edit: float = 0.0
    wall_s: float = 0.0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _migrated_home(root: Path) -> Path:
    template = root / "template"
    template.mkdir()
    env = child_env(AIRFLOW_HOME=str(template))
    subprocess.run(
        [PYTHON, "-m", "airflow", "db", "migrate"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    return template


def _segments(log: str) -> list[float]:
    """Task-runner segments from a ``dag.test`` log: each from "[DAG TEST] running task" to the
    next deferral or "[DAG TEST] end task".
    """
    segments: list[float] = []
    started: datetime | None = None
    for line in log.splitlines():
        match = _STAMP.match(line)
        if match is None:
            continue
        when = datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        if "[DAG TEST] running task" in line:
            started = when
        elif started is not None and ("Pausing task as DEFERRED" in line or "[DAG TEST] end task" in line):
            segments.append((when - started).total_seconds())
            started = None
    return segments


def _launch(
    root: Path, template: Path, dag_id: str, emulator: EmulatorProcess, edits: int
) -> tuple[subprocess.Popen[str], Path, Path]:
    home = root / f"{dag_id}-{emulator.prediction_seconds:g}"
    shutil.copytree(template, home)
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(BENCH_DIR / "dags" / "kontext_bench_slots.py", dags)
    out = home / "slots.jsonl"
    env = child_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT=connection_json(emulator.base_url),
        BENCH_EDITS=str(edits),
        BENCH_IMAGE=TINY_PNG,
        BENCH_SLOTS_OUT=str(out),
        BENCH_BASE_URL=emulator.base_url,
        REPLICATE_POLL_INTERVAL="0.5",
    )
    log = home / "dag-test.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [PYTHON, "-m", "airflow", "dags", "test", dag_id],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return process, out, log


def _collect(
    dag_id: str, seconds: float, edits: int, code: int, out: Path, log: Path, wall: float
) -> SlotResult:
    result = SlotResult(dag_id, seconds, edits, ok=code == 0, wall_s=round(wall, 1))
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    executes = [r["seconds"] for r in records if r["phase"] == "execute"]
    completes = [r["seconds"] for r in records if r["phase"] == "execute_complete"]
    if dag_id == "kontext_bench_deferrable":
        result.operator_seconds = [a + b for a, b in zip(executes, completes, strict=False)]
    else:
        result.operator_seconds = executes
    text = log.read_text(errors="replace")
    segments = _segments(text)
    per_edit = max(1, len(segments) // max(1, edits))
    result.segments_per_edit = len(segments) / max(1, edits)
    result.segment_seconds = [sum(segments[i : i + per_edit]) for i in range(0, len(segments), per_edit)]
    if code != 0 or len(result.operator_seconds) != edits:
        tail = "\n".join(text.splitlines()[-5:])
        result.ok = False
        result.error = f"exit {code}, {len(result.operator_seconds)} of {edits} edits timed: {tail[-300:]}"
    return result


def run(durations: tuple[float, ...] = (2.0, 8.0), edits: int = 3) -> list[SlotResult]:
    import time

    results: list[SlotResult] = []
    root = Path(tempfile.mkdtemp(prefix="kontext-bench-slots-"))
    try:
        template = _migrated_home(root)
        for seconds in durations:
            with EmulatorProcess(prediction_seconds=seconds, output_scale=0.02) as emulator:
                started = time.monotonic()
                launched = {dag_id: _launch(root, template, dag_id, emulator, edits) for dag_id in VARIANTS}
                for dag_id, (process, out, log) in launched.items():
                    try:
                        code = process.wait(timeout=240)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        code = process.wait()
                    results.append(
                        _collect(dag_id, seconds, edits, code, out, log, time.monotonic() - started)
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def summary(results: list[SlotResult]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        rows.append(
            {
                "variant": VARIANTS[result.dag_id],
                "dag_id": result.dag_id,
                "prediction_seconds": result.prediction_seconds,
                "edits": result.edits,
                "ok": result.ok,
                "operator_mean_s": statistics.fmean(result.operator_seconds)
                if result.operator_seconds
                else None,
                "operator_max_s": max(result.operator_seconds) if result.operator_seconds else None,
                # the first edit of each DAG pays the dag.test process's imports: left out
                "segment_median_s": (
                    statistics.median(result.segment_seconds[1:] or result.segment_seconds)
                    if result.segment_seconds
                    else None
                ),
                "segments_per_edit": result.segments_per_edit,
                "error": result.error,
            }
        )
    return rows
