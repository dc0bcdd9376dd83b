"""Test a distributed deployment on one machine: Celery, Redis, PostgreSQL, two workers, two triggerers.

A distributed deployment on one machine: CeleryExecutor with a Redis broker, PostgreSQL as the
metadata DB and result backend, two Celery workers and two triggerers running mapped edits against
the emulator, with 429s on a share of all requests. Once several edits are deferred, the triggerer
holding the most triggers is SIGKILLed and started again; while edits resume, the worker running
the most of them is SIGKILLed (and not restarted: the other one finishes the run).

Every task must succeed, with exactly one prediction per edit (none twice), each task's output the
output of its own prompt's prediction, and at most one resume per try.

Redis and PostgreSQL are installed (Debian's ``redis-server`` and ``postgresql``, when running as
root with apt-get) and started by the set-up under a scratch folder; the Python side needs the
``distributed`` dependency group. The test is skipped, saying why, where either cannot be had.
Run it with ``pytest -m distributed tests/e2e/test_distributed.py`` (about 4-5 minutes on 2 cores,
~4.3 GB resident).
"""

from __future__ import annotations

import base64
import collections
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env, free_port
from .conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.distributed, pytest.mark.timeout(1200)]

TOKEN = "r8_Distributed_Canary_3c9b61"
DAG_ID = "kontext_distributed"
EDITS = 24
#: Share of all requests (creates and polls) answered 429, from the emulator's seeded RNG.
THROTTLED_SHARE = 0.25
#: Deferred edits assigned to triggerers before the busiest triggerer is killed.
TRIGGERS_BEFORE_KILL = 8

DAG = '''
import time
import uuid
from datetime import timedelta
from pathlib import Path

from airflow.sdk import DAG
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

RESUMES = Path({resumes!r})


class RecordsResumes(FluxKontextEditOperator):
    """Notes each resume (map index, try) in a file, then takes a few seconds: a resume long enough
    for the test to find it running and kill its worker."""

    def execute_complete(self, context, event):
        ti = context["ti"]
        (RESUMES / f"{{ti.map_index}}.{{ti.try_number}}.{{uuid.uuid4().hex}}").write_text(
            str(event.get("prediction_id"))
        )
        time.sleep(3)
        return super().execute_complete(context, event)


with DAG(dag_id={dag_id!r}, schedule=None, catchup=False,
         default_args={{"retries": 2, "retry_delay": timedelta(seconds=2)}}):
    RecordsResumes.partial(
        task_id="edit", input_image={image!r}, output_format="png", poll_interval=1.0
    ).expand(prompt=[f"distributed edit {{i}}" for i in range({edits})])
'''

HOSTNAME_MODULE = '''
import os


def hostname():
    """Each Airflow process's name, so the metadata DB tells the workers and triggerers apart."""
    return os.environ["KONTEXT_HOSTNAME"]
'''


# --- Redis and PostgreSQL, installed and started here -------------------------------------------------


def _apt_install(package: str) -> str | None:
    """Install a Debian package; ``None`` on success, else why it could not be."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-q", package], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        if update.returncode == 0:
            proc = subprocess.run(
                ["apt-get", "install", "-y", "-q", package],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
    return None if proc.returncode == 0 else f"apt-get install {package} failed: {proc.stderr[-500:]}"


def _postgres_bin() -> Path | None:
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _require_services() -> tuple[str, Path]:
    """``redis-server`` and PostgreSQL's bin folder, installed if need be; skips if impossible."""
    for module in ("psycopg2", "asyncpg", "redis", "celery", "airflow.providers.celery"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(
                f"{module} is missing: install the 'distributed' dependency group "
                "(uv pip install --group distributed)"
            )
    if not shutil.which("redis-server") and (why := _apt_install("redis-server")):
        pytest.skip(f"Redis is not installed and cannot be: {why}")
    if _postgres_bin() is None and (why := _apt_install("postgresql")):
        pytest.skip(f"PostgreSQL is not installed and cannot be: {why}")
    redis_server, pg_bin = shutil.which("redis-server"), _postgres_bin()
    if redis_server is None or pg_bin is None:
        pytest.skip("redis-server or PostgreSQL's initdb still not found after installing them")
    return redis_server, pg_bin


def _wait_port(port: int, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not listen on {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, int]]:
    """Start a Redis and a PostgreSQL (database ``airflow``, user ``airflow``, trust auth) on loopback."""
    redis_server, pg_bin = _require_services()
    scratch = Path(tempfile.mkdtemp(prefix="kontext-distributed-"))
    scratch.chmod(0o755)
    as_postgres: list[str] = []
    data = scratch / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        subprocess.run(
            [*as_postgres, str(pg_bin / "initdb"), "-D", str(data), "-U", "airflow", "-A", "trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pg_port, redis_port = free_port(), free_port()
        logs = (scratch / "services.log").open("ab")
        postgres = subprocess.Popen(
            [
                *as_postgres,
                str(pg_bin / "postgres"),
                "-D",
                str(data),
                "-p",
                str(pg_port),
                "-k",
                str(data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=off",
            ],
            stdout=logs,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append((postgres, signal.SIGINT))  # SIGINT: PostgreSQL's fast shutdown
        redis = subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=logs,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append((redis, signal.SIGTERM))
        _wait_port(pg_port, "PostgreSQL", postgres)
        _wait_port(redis_port, "Redis", redis)
        import psycopg2

        deadline = time.monotonic() + 60
        while True:
            try:
                db = psycopg2.connect(host="127.0.0.1", port=pg_port, user="airflow", dbname="postgres")
                break
            except psycopg2.OperationalError:  # still starting up
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        db.autocommit = True
        with db.cursor() as cur:
            cur.execute("CREATE DATABASE airflow")
        db.close()
        yield {"postgres": pg_port, "redis": redis_port}
    finally:
        for proc, sig in reversed(procs):
            _stop(proc, sig)
        shutil.rmtree(scratch, ignore_errors=True)


# --- the Airflow cluster -------------------------------------------------------------------------------


class PostgresCluster(Cluster):
    """:class:`Cluster` whose metadata DB is PostgreSQL."""

    def __init__(self, home: Path, env: dict[str, str], pg_port: int) -> None:
        super().__init__(home, env)
        self.pg_port = pg_port

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg2

        try:
            db = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="airflow", dbname="airflow")
        except psycopg2.OperationalError:
            return []
        try:
            with db.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except psycopg2.Error:  # not migrated yet: ask again later
            return []
        finally:
            db.close()


def _image_uri() -> str:
    png = (ROOT / "example_dags" / "images" / "mug.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def distributed_run(
    services: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("distributed-home")
    dags, resumes, pythonpath = home / "dags", home / "resumes", home / "pythonpath"
    for folder in (dags, resumes, pythonpath):
        folder.mkdir()
    (pythonpath / "kontext_hostname.py").write_text(HOSTNAME_MODULE)
    (dags / f"{DAG_ID}.py").write_text(
        DAG.format(resumes=str(resumes), dag_id=DAG_ID, image=_image_uri(), edits=EDITS)
    )
    pg = f"airflow@127.0.0.1:{services['postgres']}/airflow"
    with FluxKontextEmulator(
        token=TOKEN, prediction_seconds=8.0, start_seconds=0.5, output_scale=0.1, fault_seed=15
    ) as api:
        api.faults.throttle(probability=THROTTLED_SHARE, available_in=0.2)
        connection = {
            "conn_type": "fluxkontext",
            "host": api.base_url,
            "password": TOKEN,
            # 12 retries: a 25 % share of 429s then exhausts one request's retries about once in 6e7.
            "extra": {"backoff_base": 0.2, "backoff_max": 1, "retry_after_max": 2, "max_retries": 12},
        }
        env = cluster_env(
            home,
            dags,
            {"flux_kontext_default": connection},
            AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
            AIRFLOW__CORE__PARALLELISM="16",
            AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="32",
            AIRFLOW__CORE__HOSTNAME_CALLABLE="kontext_hostname.hostname",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"postgresql+psycopg2://{pg}",
            AIRFLOW__CELERY__BROKER_URL=f"redis://127.0.0.1:{services['redis']}/0",
            # With SQLAlchemy 2.1, plain db+postgresql:// would mean psycopg 3.
            AIRFLOW__CELERY__RESULT_BACKEND=f"db+postgresql+psycopg2://{pg}",
            AIRFLOW__CELERY__WORKER_CONCURRENCY="4",
            # A killed worker's unacknowledged messages come back after this (default: 6 hours).
            AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT="60",
            # The killed worker's running tasks are noticed after this (default 300 s) and retried.
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
            AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT="90",
            # The killed triggerer's triggers are adopted once its heartbeat is this stale (30 s).
            AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD="10",
            PYTHONPATH=os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")])),
            KONTEXT_HOSTNAME="main",
        )
        # Each worker and triggerer: its own name in the DB and its own log-server port.
        roles = {
            "worker-1": ("celery", "worker", "--celery-hostname", "worker-1@%h"),
            "worker-2": ("celery", "worker", "--celery-hostname", "worker-2@%h"),
            "triggerer-1": ("triggerer",),
            "triggerer-2": ("triggerer",),
        }
        role_env = {
            name: {
                "KONTEXT_HOSTNAME": name,
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            }
            for name in roles
        }
        cluster = PostgresCluster(home, env, services["postgres"])
        cluster.cli("db", "migrate")
        events: dict[str, Any] = {"triggers_held": collections.Counter()}
        try:
            for name in ("api-server", "scheduler", "dag-processor"):
                cluster.start(name)
            for name, command in roles.items():
                cluster.start(name, *command, env=role_env[name])
            cluster.wait_for(
                "the DAG to be parsed",
                lambda: bool(cluster.query("select 1 from dag where dag_id = %s", DAG_ID)),
                180,
            )
            cluster.cli("dags", "trigger", DAG_ID)

            def held_by_triggerer() -> dict[str, int]:
                rows = cluster.query(
                    "select j.hostname, count(*) from trigger t join job j on j.id = t.triggerer_id "
                    "group by j.hostname"
                )
                return {host: count for host, count in rows}

            def several_deferred_and_held() -> bool:
                held = held_by_triggerer()
                events["triggers_held"].update({host: 0 for host in held})
                return sum(held.values()) >= TRIGGERS_BEFORE_KILL

            cluster.wait_for("several edits deferred and held by triggerers", several_deferred_and_held, 300)
            held = held_by_triggerer()
            victim = max(held, key=lambda host: held[host])
            events["triggerer_killed"] = (victim, held)
            events["requests_at_triggerer_kill"] = len(api.requests)
            cluster.kill(victim)
            time.sleep(2)
            cluster.start(victim, *roles[victim], env=role_env[victim])

            def resuming_on_a_worker() -> bool:
                for host, count in held_by_triggerer().items():
                    events["triggers_held"][host] = max(events["triggers_held"][host], count)
                rows = cluster.query(
                    "select hostname, count(*) from task_instance where dag_id = %s and state = 'running' "
                    "and next_method is not null group by hostname",
                    DAG_ID,
                )
                running = {host: count for host, count in rows if host in roles}
                if running:
                    events["worker_killed"] = (max(running, key=lambda h: running[h]), running)
                return bool(running)

            cluster.wait_for("an edit resuming on a worker", resuming_on_a_worker, 300)
            cluster.kill(events["worker_killed"][0])

            def finished() -> bool:
                rows = cluster.query("select state from dag_run where dag_id = %s", DAG_ID)
                return bool(rows) and rows[0][0] in ("success", "failed")

            cluster.wait_for("the run to finish", finished, 600)
            tis = cluster.query(
                "select map_index, state, try_number from task_instance where dag_id = %s", DAG_ID
            )
            xcoms = cluster.query(
                "select map_index, value from xcom where dag_id = %s and key = 'return_value'", DAG_ID
            )
        finally:
            cluster.stop_all()
        yield {
            "api": api,
            "tis": tis,
            "xcoms": xcoms,
            "resumes": [path.name.split(".")[:2] for path in resumes.iterdir()],
            "events": events,
        }


# --- what must hold ------------------------------------------------------------------------------------


def test_every_task_succeeded(distributed_run: dict[str, Any]) -> None:
    tis = distributed_run["tis"]
    assert sorted(map_index for map_index, _, _ in tis) == list(range(EDITS))
    assert {state for _, state, _ in tis} == {"success"}, tis
    print(f"tries per edit: {collections.Counter(tries for _, _, tries in tis)}")


def test_both_kills_happened_and_both_triggerers_ran_triggers(distributed_run: dict[str, Any]) -> None:
    events, api = distributed_run["events"], distributed_run["api"]
    victim, held = events["triggerer_killed"]
    assert victim in ("triggerer-1", "triggerer-2")
    assert held[victim] == max(held.values())
    assert held[victim] > 0
    assert len(api.requests) > events["requests_at_triggerer_kill"]  # polling went on after the kill
    worker, running = events["worker_killed"]
    assert worker in ("worker-1", "worker-2")
    assert running[worker] > 0
    print(f"killed {victim} holding {held}; killed {worker} running resumes {running}")
    print(f"most triggers held at once: {dict(events['triggers_held'])}")


def test_one_prediction_per_edit_none_twice(distributed_run: dict[str, Any]) -> None:
    api = distributed_run["api"]
    prompts = collections.Counter(record.prompt for record in api.predictions.values())
    assert prompts == collections.Counter(f"distributed edit {i}" for i in range(EDITS))
    assert api.created_count == EDITS
    assert all(api.prediction(pid).status.value == "succeeded" for pid in api.predictions)


def test_throttling_was_served_and_survived(distributed_run: dict[str, Any]) -> None:
    statuses = collections.Counter(record.status for record in distributed_run["api"].requests)
    share = statuses[429] / sum(statuses.values())
    assert 0.1 < share < 0.4, statuses
    throttled_creates = [r for r in distributed_run["api"].requests if r.method == "POST" and r.status == 429]
    assert throttled_creates  # creates were throttled too, and still made one prediction each


def test_each_output_is_its_own_prompts(distributed_run: dict[str, Any]) -> None:
    api = distributed_run["api"]
    by_prompt = {record.prompt: pid for pid, record in api.predictions.items()}
    outputs = {}
    for map_index, value in distributed_run["xcoms"]:
        outputs[map_index] = json.loads(value) if isinstance(value, str) else value
    assert sorted(outputs) == list(range(EDITS))
    for map_index, output in outputs.items():
        expected = api.prediction(by_prompt[f"distributed edit {map_index}"]).output_urls
        assert output == expected, (map_index, output, expected)


def test_at_most_one_resume_per_try(distributed_run: dict[str, Any]) -> None:
    resumes = collections.Counter(tuple(key) for key in distributed_run["resumes"])
    assert resumes, "no edit resumed after deferring"
    twice = {key: count for key, count in resumes.items() if count > 1}
    assert twice == {}, f"(map index, try) resumed more than once: {twice}"
