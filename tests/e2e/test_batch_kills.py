"""Test a batch of edits through three crashes in a real Airflow: every image edited exactly once.

One DAG run, one ``FluxKontextBatchEditOperator`` task of :data:`IMAGES` small PNGs (sent inline),
in a real cluster (LocalExecutor scheduler, dag-processor, api-server, triggerer; sqlite) against
the emulator on 127.0.0.1. Three crashes, each detected in its phase before it is made and proved
to have landed there afterwards:

1. The worker's task process is SIGKILLed while it creates (a third of the predictions exist, the
   emulator holding each create's answer so some creates are always in flight); the retry finds
   the predictions of the creates whose answer was lost in the account's list, and creates the rest.
2. The triggerer (its whole process group) is SIGKILLed while it holds the batch's wait (the task
   deferred, the trigger assigned to that triggerer and reading the account's list, predictions
   still running), then started again; the new triggerer adopts the trigger and fires it.
3. The worker's task process is SIGKILLed during the resume (after the trigger event, while the
   outputs are saved, the emulator holding each download); the next try saves the rest.

What a worker crash is here: SIGKILL of the task process's process group (the Task SDK gives the
task process its own group; SIGKILL of the group is what the OOM killer or ``kill -9`` of a task does
to it and anything it started), the supervisor surviving to report the failure, as it does in a
real deployment where a task dies. The run must succeed in try 3 (one try per worker kill), with
exactly one prediction per image (matched by its input image and prompt), and each image's output
saved from its own prediction.

Not run by default (about 2 minutes on 2 cores); one command, printing what each kill found::

    .venv/bin/python -m pytest -m batchkills -s tests/e2e/test_batch_kills.py
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from airflow_provider_kontext.edits.batch_ledger import BATCH_KEY
from airflow_provider_kontext.operators.batch_finish import FLUSH_EVERY
from airflow_provider_kontext.testing import faults
from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env

pytestmark = [pytest.mark.e2e, pytest.mark.batchkills, pytest.mark.timeout(900)]

TOKEN = "r8_BatchKills_Canary_6d1f0a"
DAG_ID = "kontext_batch_kills"
TASK_ID = "edit_all"
IMAGES = 80
assert IMAGES > FLUSH_EVERY + 10  # the resume is killed between the record's flushes of saved outputs
#: Creates per minute the operator paces to: 80 images take ~10 s to create.
CREATES_PER_MINUTE = 480
#: Seconds the emulator holds each create's answer after creating its prediction: a kill always
#: finds creates whose prediction exists but whose answer the worker has not read.
CREATE_ANSWER_HOLD = 0.8
#: Seconds the emulator holds each output download: saving the outputs takes ~10 s.
DOWNLOAD_HOLD = 0.5
DOWNLOADS_AT_ONCE = 4
#: Long enough that the triggerer is killed while predictions run, on a busy machine too.
PREDICTION_SECONDS = 20.0
#: The task process's title (Task SDK): ``airflow worker -- <task instance id>``.
TASK_TITLE = re.compile(r"^airflow worker -- ([0-9a-f-]{36})$")
LIST_READ = re.compile(r"/v1/predictions$")

DAG = """
from datetime import timedelta

from airflow.sdk import DAG
from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator

with DAG(dag_id={dag_id!r}, schedule=None, catchup=False,
         default_args={{"retries": 3, "retry_delay": timedelta(seconds=1)}}):
    FluxKontextBatchEditOperator(
        task_id={task_id!r},
        input_images={shots!r},
        prompt={prompts!r},
        output_format="png",
        output_path={out!r},
        creates_per_minute={cpm},
        max_concurrent_creates=16,
        max_concurrent_downloads={downloads},
        poll_interval=0.5,
        deferrable=True,
    )
"""


def _prompt(number: int) -> str:
    return f"batch kills: make shot {number:02d} a watercolour"


def _shots(folder: Path) -> dict[str, int]:
    """Write the images (each distinct); return their bytes' digests by image number."""
    folder.mkdir(parents=True)
    digests = {}
    for number in range(IMAGES):
        path = folder / f"shot{number:02d}.png"
        Image.new("RGB", (32, 32), (number * 3, 255 - number * 3, (number * 41) % 256)).save(path)
        digests[hashlib.sha256(path.read_bytes()).hexdigest()] = number
    assert len(digests) == IMAGES
    return digests


def _ti(cluster: Cluster) -> dict[str, Any] | None:
    rows = cluster.query(
        "select id, state, try_number, next_method, trigger_id from task_instance "
        "where dag_id = ? and task_id = ?",
        DAG_ID,
        TASK_ID,
    )
    if not rows:
        return None
    ti_id, state, tries, next_method, trigger_id = rows[0]
    return {"id": ti_id, "state": state, "try": tries, "next": next_method, "trigger": trigger_id}


def _phase(ti: dict[str, Any]) -> tuple[str, int, str | None]:
    return ti["state"], ti["try"], ti["next"]


def _try(cluster: Cluster) -> int:
    return int((_ti(cluster) or {}).get("try") or 0)


def _task_process(cluster: Cluster, ti_id: str) -> psutil.Process | None:
    """Return the task process (a descendant of the scheduler) running the task instance ``ti_id``."""
    try:
        children = psutil.Process(cluster.procs["scheduler"].pid).children(recursive=True)
    except psutil.Error:
        return None
    for proc in children:
        try:
            match = TASK_TITLE.match(" ".join(proc.cmdline()).strip())
        except psutil.Error:
            continue
        if match and match.group(1).replace("-", "") == ti_id.replace("-", ""):
            return proc
    return None


def _find_task(cluster: Cluster, what: str, phase: dict[str, Any]) -> psutil.Process:
    """Wait for the task instance to be in ``phase`` (state, try, next method) with its process up."""
    found: list[psutil.Process] = []

    def ready() -> bool:
        ti = _ti(cluster)
        if ti is None or any(ti[key] != value for key, value in phase.items()):
            return False
        proc = _task_process(cluster, ti["id"])
        if proc is not None:
            found.append(proc)
        return proc is not None

    cluster.wait_for(what, ready, 240)
    return found[-1]


def _kill_task(proc: psutil.Process) -> float:
    """SIGKILL the task process's group; return when (Unix time) once it is gone."""
    assert os.getpgid(proc.pid) == proc.pid  # its own group: the supervisor is not in it
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.time()
    proc.wait(timeout=30)
    return killed


def _ledger(cluster: Cluster) -> dict[str, list[str]]:
    """Return the predictions of the batch's record (the task state store) by their images' state."""
    rows = cluster.query(
        "select value from task_state_store where dag_id = ? and task_id = ? and key like ?",
        DAG_ID,
        TASK_ID,
        f"{BATCH_KEY}/%",
    )
    states: dict[str, list[str]] = {}
    for (value,) in rows:
        chunk = json.loads(value)
        chunk = json.loads(chunk) if isinstance(chunk, str) else chunk
        for entry in chunk.values():
            states.setdefault(entry.get("s", "?"), []).append(entry.get("id", ""))
    return states


def _counts(states: dict[str, list[str]]) -> dict[str, int]:
    return {state: len(ids) for state, ids in states.items()}


def _downloads(api: FluxKontextEmulator) -> collections.Counter[str]:
    """Return how many times each prediction's outputs were downloaded (``/files/<id>/<name>``)."""
    return collections.Counter(
        r.path.split("/")[2] for r in api.requests if r.method == "GET" and r.path.startswith("/files/")
    )


def _outputs(out: Path) -> list[Path]:
    return sorted(out.glob("shot*-*.png"))


def _list_reads(api: FluxKontextEmulator) -> int:
    return sum(1 for r in api.requests if r.method == "GET" and LIST_READ.search(r.path))


def _triggerer_jobs(cluster: Cluster) -> set[int]:
    rows = cluster.query("select id from job where job_type = 'TriggererJob'")
    return {int(row[0]) for row in rows}


def _wait_until(check: Any, timeout: float, what: str, cluster: Cluster, step: float = 0.02) -> None:
    """Poll ``check`` often (a phase may be short); fail with the cluster's logs on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(step)
    cluster.wait_for(what, check, 0)  # raises, with the cluster's logs


def test_batch_survives_worker_kills_in_create_and_resume_and_a_triggerer_kill(tmp_path: Path) -> None:
    started = time.monotonic()
    home = tmp_path / "home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    shots, out = tmp_path / "shots", tmp_path / "out"
    digests = _shots(shots)
    (dags / f"{DAG_ID}.py").write_text(
        DAG.format(
            dag_id=DAG_ID,
            task_id=TASK_ID,
            shots=str(shots),
            prompts=[_prompt(n) for n in range(IMAGES)],
            out=str(out),
            cpm=CREATES_PER_MINUTE,
            downloads=DOWNLOADS_AT_ONCE,
        )
    )
    evidence: dict[str, Any] = {}
    with FluxKontextEmulator(
        token=TOKEN, prediction_seconds=PREDICTION_SECONDS, start_seconds=0.3, output_scale=0.1
    ) as api:
        api.faults.slow(
            CREATE_ANSWER_HOLD, probability=1.0, method="POST", path=faults.CREATE, after_processing=True
        )
        api.faults.slow(DOWNLOAD_HOLD, probability=1.0, method="GET", path="/files/*")
        connection = {
            "conn_type": "fluxkontext",
            "host": api.base_url,
            "password": TOKEN,
            "extra": {"backoff_base": 0.2, "backoff_max": 1, "retry_after_max": 2},
        }
        env = cluster_env(
            home,
            dags,
            {"flux_kontext_default": connection},
            # A killed triggerer's triggers are adopted once its heartbeat is this stale (default 30 s).
            AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD="5",
        )
        cluster = Cluster(home, env)
        cluster.cli("db", "migrate")
        try:
            for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
                cluster.start(name)
            cluster.wait_for(
                "the DAG to be parsed",
                lambda: bool(cluster.query("select 1 from dag where dag_id = ?", DAG_ID)),
                180,
            )
            cluster.cli("dags", "trigger", DAG_ID, "--run-id", "kills")
            evidence["cluster_up"] = time.monotonic() - started

            # 1. The worker, while it creates: a third of the predictions exist.
            proc = _find_task(cluster, "try 1 running", {"state": "running", "try": 1, "next": None})
            _wait_until(lambda: api.created_count >= IMAGES // 3, 120, "a third created", cluster, 0.01)
            evidence["create_kill"] = {"created": api.created_count, "ti": _ti(cluster)}
            evidence["create_kill"]["time"] = _kill_task(proc)
            evidence["create_kill"]["ledger"] = _ledger(cluster)
            cluster.wait_for(
                "try 1 to end",
                lambda: (_ti(cluster) or {}).get("state") != "running" or _try(cluster) > 1,
                120,
            )

            # 2. The triggerer, while it holds the batch's wait.
            cluster.wait_for(
                "try 2 to create the rest and defer",
                lambda: (_ti(cluster) or {}).get("state") == "deferred" and _try(cluster) == 2,
                240,
            )
            deferred_reads = _list_reads(api)
            old = _triggerer_jobs(cluster)

            def held_by_triggerer() -> bool:
                ti = _ti(cluster) or {}
                rows = cluster.query("select triggerer_id from trigger where id = ?", ti.get("trigger"))
                return bool(rows and rows[0][0] in old) and _list_reads(api) > deferred_reads

            cluster.wait_for("the triggerer to read the list for the batch", held_by_triggerer, 120)
            newest = max(api.predictions.values(), key=lambda record: record.created_mono).id
            evidence["triggerer_kill"] = {
                "ti": _ti(cluster),
                "newest_status": api.prediction(newest).status.value,
                "created": api.created_count,
            }
            cluster.kill("triggerer")
            evidence["triggerer_kill"]["after"] = _ti(cluster)
            cluster.start("triggerer")

            def adopted() -> bool:
                ti = _ti(cluster) or {}
                rows = cluster.query("select triggerer_id from trigger where id = ?", ti.get("trigger"))
                if ti.get("state") == "deferred" and rows and rows[0][0] not in (None, *old):
                    evidence["triggerer_kill"]["adopted_by"] = rows[0][0]
                return "adopted_by" in evidence["triggerer_kill"]

            cluster.wait_for("the new triggerer to adopt the batch's trigger", adopted, 180)

            # 3. The worker, during the resume: the record holds the first FLUSH_EVERY outputs saved,
            # the others are being saved.
            proc = _find_task(
                cluster, "the resume", {"state": "running", "try": 2, "next": "execute_complete"}
            )
            _wait_until(lambda: "succeeded" in _ledger(cluster), 120, "outputs recorded", cluster)
            evidence["resume_kill"] = {"saved": len(_outputs(out)), "ti": _ti(cluster)}
            evidence["resume_kill"]["time"] = _kill_task(proc)
            evidence["resume_kill"]["saved_after"] = len(_outputs(out))
            evidence["resume_kill"]["ledger"] = _ledger(cluster)

            cluster.wait_for(
                "the task to end", lambda: (_ti(cluster) or {}).get("state") in ("success", "failed"), 300
            )
            final = _ti(cluster)
            xcom = cluster.query(
                "select value from xcom where dag_id = ? and task_id = ? and key = 'return_value'",
                DAG_ID,
                TASK_ID,
            )
        finally:
            cluster.stop_all()
        evidence["elapsed"] = time.monotonic() - started
        api.faults.clear()
        records = api.predictions
        fetched = _downloads(api)
        downloads = {
            pid: [urllib.request.urlopen(url, timeout=30).read() for url in api.prediction(pid).output_urls]
            for pid in records
        }
    logs = {
        attempt: "\n".join(p.read_text(errors="replace") for p in home.glob(f"logs/**/attempt={attempt}.log"))
        for attempt in (1, 2, 3)
    }
    lost = re.findall(r"Adopting prediction (\w+), created by an earlier try", logs[2])
    evidence["try2_adopted"] = len(lost)
    evidence["try2_lost_recreated"] = logs[2].count("No prediction of an earlier try adopted")
    recorded = evidence["resume_kill"].pop("ledger")
    evidence["resume_kill"]["ledger"] = _counts(recorded)
    evidence["create_kill"]["ledger"] = _counts(evidence["create_kill"]["ledger"])
    evidence["downloads"] = dict(collections.Counter(fetched.values()))
    print(f"\nbatch kills: {json.dumps(evidence, default=str)}")

    # The kills landed in their phases.
    create_kill, triggerer_kill, resume_kill = (
        evidence["create_kill"],
        evidence["triggerer_kill"],
        evidence["resume_kill"],
    )
    assert _phase(create_kill["ti"]) == ("running", 1, None)  # creating, not resumed
    assert IMAGES // 3 <= create_kill["created"] < IMAGES
    made_before = sum(1 for r in records.values() if r.created_wall <= create_kill["time"] + 1.0)
    assert made_before < IMAGES, "try 1 created every image: the kill came after the creates"
    # Its record: creates under way (their answers lost with the process), none past "created".
    assert create_kill["ledger"]["creating"] >= 1
    assert set(create_kill["ledger"]) <= {"creating", "created"}
    assert lost, "the kill cut no create in flight"  # the held answers guarantee some
    assert f"of {IMAGES} images already started by an earlier try" in logs[2]
    assert _phase(triggerer_kill["ti"]) == ("deferred", 2, "execute_complete")
    assert triggerer_kill["created"] == IMAGES
    assert triggerer_kill["newest_status"] not in ("succeeded", "failed", "canceled", "aborted")
    assert _phase(triggerer_kill["after"]) == ("deferred", 2, "execute_complete")  # it fired nothing
    assert _phase(resume_kill["ti"]) == ("running", 2, "execute_complete")  # the resume of try 2
    assert 1 <= resume_kill["saved"] < IMAGES
    assert resume_kill["saved_after"] < IMAGES
    # The record held some images' outputs saved and others still to save ...
    assert resume_kill["ledger"] == {"succeeded": FLUSH_EVERY, "created": IMAGES - FLUSH_EVERY}
    # ... so the next try downloaded the others again (once; twice for those the killed try had
    # saved or was saving but not yet recorded), never the recorded ones.
    assert {fetched[pid] for pid in recorded["succeeded"]} == {1}
    assert {fetched[pid] for pid in recorded["created"]} <= {1, 2}
    assert "Batch wait ended (done)" in logs[2]
    assert f"Batch: {IMAGES} of {IMAGES} images already started by an earlier try" in logs[3]
    assert f"Batch finished: {IMAGES} images: {IMAGES} succeeded" in logs[3]

    # The task succeeded in the try after the second worker kill.
    assert final is not None
    assert (final["state"], final["try"]) == ("success", 3), final

    # Exactly one prediction per image, matched by its input image and its prompt.
    assert api.created_count == len(records) == IMAGES
    image_of: dict[str, int] = {}
    for pid, record in records.items():
        data = record.input["input_image"]
        assert data.startswith("data:image/png;base64,")
        number = digests[hashlib.sha256(base64.b64decode(data.split(",", 1)[1])).hexdigest()]
        assert record.prompt == _prompt(number), (pid, record.prompt)
        image_of[pid] = number
    assert sorted(image_of.values()) == list(range(IMAGES))  # none twice, none missing
    pid_of = {number: pid for pid, number in image_of.items()}

    # Every image's output, from its own prediction, in return_value and in the output folder.
    (value,) = xcom
    result = json.loads(value[0]) if isinstance(value[0], str | bytes) else value[0]
    assert len(result) == IMAGES
    for number, paths in enumerate(result):
        (path,) = paths
        local = Path(path.removeprefix("file://"))
        assert local.name == f"shot{number:02d}-{pid_of[number]}.png", (number, path)
        assert [local.read_bytes()] == downloads[pid_of[number]], (number, path)
    assert [p.name for p in _outputs(out)] == [f"shot{n:02d}-{pid_of[n]}.png" for n in range(IMAGES)]
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"succeeded": IMAGES}
    assert TOKEN not in "\n".join(logs.values())
