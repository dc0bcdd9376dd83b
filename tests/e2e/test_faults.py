"""Test faults from the emulator's fault injection in real Airflow runs: one prediction per task.

Faults, against the emulator's fault injection, in real Airflow runs: each run must end correctly
with exactly one prediction created per task (or, where a create may have reached the server, with a
clear failure for a human and still no second prediction).

``test_fault_table`` runs one ``airflow dags test`` of a DAG with one task per fault; each task has
its own connection and its own emulator, so a fault hits only its task and the counts are per fault.
``test_real_cluster_*`` runs a real scheduler, dag-processor, api-server and triggerer (LocalExecutor,
DEBUG logs): the triggerer is killed while edits are deferred and restarted, and a worker process
dies (``os._exit``) right after its create; it also checks that, with real Airflow components, no
secret shows anywhere. docs/hardening.md's fault table is what these tests assert.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from airflow_provider_kontext.testing import faults
from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env, status_reads
from .conftest import ROOT, Airflow

pytestmark = pytest.mark.e2e

TOKEN = "r8_FaultsE2E_Canary_8d1e5a27"
CREATE = re.compile(r"/v1/(models/[^/]+/[^/]+/)?predictions$")
POLL = re.compile(r"/v1/predictions/[a-z0-9]+$")

#: The crash-after-create operator, shared by both DAGs: ``mode`` "raise" fails the try in process
#: (``dags test`` runs tasks in its own process); "exit" kills the worker process outright.
CRASHING_OPERATOR = '''
import os
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator


class DiesRightAfterCreate(FluxKontextEditOperator):
    """The first try dies right after the create returned and the id was stored."""

    def __init__(self, *, mode, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def execute(self, context):
        self._try_number = context["ti"].try_number
        return super().execute(context)

    def _start(self, *args, **kwargs):
        prediction, deadline = super()._start(*args, **kwargs)
        if self._try_number == 1:
            print(f"simulated worker death right after creating {prediction.id}", flush=True)
            if self.mode == "exit":
                os._exit(1)
            raise RuntimeError(f"simulated worker death right after creating {prediction.id}")
        return prediction, deadline


class DiesBeforeRecording(FluxKontextEditOperator):
    """The first try dies after the create reached the server and before its id was stored: the
    retry can only find the prediction in the account's list."""

    def execute(self, context):
        if context["ti"].try_number == 1:
            create = self.hook.create_prediction

            def created_then_died(*args, **kwargs):
                prediction = create(*args, **kwargs)
                print(f"simulated worker death before recording {prediction.id}", flush=True)
                raise RuntimeError(f"simulated worker death before recording {prediction.id}")

            self.hook.create_prediction = created_then_died
        return super().execute(context)
'''


@dataclass(frozen=True)
class Fault:
    """One row of the fault table: what is armed, on which endpoint, and what must come of it."""

    task_id: str
    title: str
    arm: Callable[[faults.Faults], Any]
    endpoint: re.Pattern[str]
    state: str
    created: int
    attempts: list[int | None]  # the faulted endpoint's answers, in order (None: dropped)
    tries: int = 1
    operator: str = "FluxKontextEditOperator"
    arguments: str = ""
    extra: dict[str, Any] | None = None


FAULTS = [
    Fault(
        "throttle_create",
        "429 burst on create (3 in a row, Replicate's body, no Retry-After)",
        lambda f: f.throttle(3, method="POST", path=faults.CREATE, available_in=0.2),
        CREATE,
        "success",
        1,
        [429, 429, 429, 201],
    ),
    Fault(
        "throttle_poll",
        "429 burst on polls (4 in a row, Retry-After: 0.2)",
        lambda f: f.throttle(4, method="GET", path=faults.PREDICTION, retry_after=0.2),
        POLL,
        "success",
        1,
        [429, 429, 429, 429, 200],
    ),
    Fault(
        "server_error_poll",
        "5xx on polls (503, 503, then a proxy's 502 HTML page)",
        lambda f: (
            f.server_error(2, method="GET", path=faults.PREDICTION, status=503),
            f.server_error(1, method="GET", path=faults.PREDICTION, status=502, html=True),
        ),
        POLL,
        "success",
        1,
        [503, 503, 502, 200],
    ),
    Fault(
        "server_error_create",
        "5xx on create, default (may have reached the server: not retried)",
        lambda f: f.server_error(1, method="POST", path=faults.CREATE, status=502),
        CREATE,
        "failed",
        0,
        [502],
    ),
    Fault(
        "server_error_create_retry",
        "5xx on create, retry_uncertain_create=True (Airflow retries the task)",
        lambda f: f.server_error(1, method="POST", path=faults.CREATE, status=502),
        CREATE,
        "success",
        1,
        [502, 201],
        tries=2,
        arguments="retry_uncertain_create=True, retries=1",
    ),
    Fault(
        "reset_poll",
        "connection reset on polls (2 in a row)",
        lambda f: f.drop_connection(2, method="GET", path=faults.PREDICTION),
        POLL,
        "success",
        1,
        [None, None, 200],
    ),
    Fault(
        "reset_create_after_processing",
        "connection reset on create after the server created it (response lost)",
        lambda f: f.drop_connection(1, method="POST", path=faults.CREATE, after_processing=True),
        CREATE,
        "failed",
        1,
        [None],
    ),
    Fault(
        "stall_poll",
        "stall longer than the read timeout (2.5 s vs 1 s) on polls",
        lambda f: f.slow(2.5, 2, method="GET", path=faults.PREDICTION),
        POLL,
        "success",
        1,
        [200, 200, 200],  # the stalled ones are answered after the client gave up
        extra={"timeout": 1},
    ),
    Fault(
        "stall_create",
        "stall longer than the read timeout (2.5 s vs 1 s) on create; the server creates it anyway",
        lambda f: f.slow(2.5, 1, method="POST", path=faults.CREATE, after_processing=True),
        CREATE,
        "failed",
        1,
        [201],
        extra={"timeout": 1},
    ),
    Fault(
        "dies_after_create",
        "worker death right after create (try 1 raises; retry reattaches)",
        lambda f: None,
        CREATE,
        "success",
        1,
        [201],
        tries=2,
        operator="DiesRightAfterCreate",
        arguments='mode="raise", retries=1',
    ),
    Fault(
        "dies_before_record",
        "worker death between the create and its record (try 1 raises; retry adopts it from the list)",
        lambda f: None,
        CREATE,
        "success",
        1,
        [201],
        tries=2,
        operator="DiesBeforeRecording",
        arguments="retries=1",
    ),
]

FAULT_DAG = """
from datetime import timedelta
from airflow.sdk import DAG
{crashing_operator}

with DAG(dag_id="kontext_faults", schedule=None, catchup=False,
         default_args={{"retries": 0, "retry_delay": timedelta(0)}}):
{tasks}
"""
FAULT_TASK = (
    "    {operator}(task_id={task_id!r}, flux_kontext_conn_id={conn_id!r}, prompt={prompt!r}, "
    "input_image={image!r}, output_format='png', poll_interval=0.3, {arguments})"
)


def _conn(base_url: str, **extra: Any) -> str:
    settings = {"backoff_base": 0.1, "backoff_max": 0.5, "retry_after_max": 1, "max_retries": 5, **extra}
    return json.dumps({"conn_type": "fluxkontext", "host": base_url, "password": TOKEN, "extra": settings})


def _image_uri() -> str:
    import base64

    png = (ROOT / "example_dags" / "images" / "mug.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode()


# --- the fault table, in one dags-test run -----------------------------------------------------------


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    airflow = Airflow(tmp_path_factory.mktemp("faults-home"))
    image = _image_uri()
    with ExitStack() as stack:
        emulators = {
            fault.task_id: stack.enter_context(
                FluxKontextEmulator(token=TOKEN, prediction_seconds=0.6, start_seconds=0.1, output_scale=0.1)
            )
            for fault in FAULTS
        }
        tasks = []
        env = {}
        for fault in FAULTS:
            fault.arm(emulators[fault.task_id].faults)
            conn_id = f"kontext_{fault.task_id}"
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = _conn(
                emulators[fault.task_id].base_url, **(fault.extra or {})
            )
            tasks.append(
                FAULT_TASK.format(
                    operator=fault.operator,
                    task_id=fault.task_id,
                    conn_id=conn_id,
                    prompt=f"fault {fault.task_id}",
                    image=image,
                    arguments=fault.arguments,
                )
            )
        source = FAULT_DAG.format(crashing_operator=CRASHING_OPERATOR, tasks="\n".join(tasks))
        (airflow.dags / "kontext_faults.py").write_text(source)
        started = time.monotonic()
        result = airflow.run_cli(["dags", "test", "kontext_faults"], env=env)
        elapsed = time.monotonic() - started
        # A create stalled past the client's timeout is still being handled: let it land.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            emulators[f.task_id].created_count < f.created for f in FAULTS
        ):
            time.sleep(0.2)
        db = sqlite3.connect(airflow.home / "airflow.db")
        tis = {
            task_id: (state, try_number)
            for task_id, state, try_number in db.execute(
                "select task_id, state, try_number from task_instance where dag_id = 'kontext_faults'"
            )
        }
        db.close()
        yield {"output": result.output, "tis": tis, "emulators": emulators, "elapsed": elapsed}


def _answers(emulator: FluxKontextEmulator, endpoint: re.Pattern[str]) -> list[int | None]:
    method = "POST" if endpoint is CREATE else "GET"  # GET /v1/predictions is the list
    return [r.status for r in emulator.requests if r.method == method and endpoint.search(r.path)]


def test_fault_table(fault_run: dict[str, Any]) -> None:
    rows = []
    problems = []
    for fault in FAULTS:
        emulator = fault_run["emulators"][fault.task_id]
        state, tries = fault_run["tis"].get(fault.task_id, ("missing", 0))
        answers = _answers(emulator, fault.endpoint)
        outcome = f"{state}" + (f" (try {tries})" if tries > 1 else "")
        rows.append(f"| {fault.title} | {len(answers)}: {answers} | {outcome} | {emulator.created_count} |")
        if (state, tries, emulator.created_count) != (fault.state, fault.tries, fault.created):
            problems.append(f"{fault.task_id}: {state} try {tries}, {emulator.created_count} created")
        # Every faulted answer came; the poll list may go on with more 200s while the model runs.
        if answers[: len(fault.attempts)] != fault.attempts or (
            fault.endpoint is CREATE and answers != fault.attempts
        ):
            problems.append(f"{fault.task_id}: answers {answers}, expected {fault.attempts}")
        # Nothing was created twice: each prediction belongs to this task's one prompt.
        prompts = [record.prompt for record in emulator.predictions.values()]
        if prompts != [f"fault {fault.task_id}"] * fault.created:
            problems.append(f"{fault.task_id}: predictions {prompts}")
    table = "\n".join(["| fault | attempts (answers) | outcome | predictions created |", *rows])
    print(f"\n{table}\n(dags test run: {fault_run['elapsed']:.0f} s)")
    assert not problems, "\n".join(problems) + "\n" + table + "\n" + fault_run["output"][-6000:]


def test_failures_say_why(fault_run: dict[str, Any]) -> None:
    output = fault_run["output"]
    # The uncertain creates fail for a human, saying a prediction may exist (and is not retried).
    assert output.count("may have reached the server") >= 3
    assert "Not retried automatically (retry_uncertain_create=False)" in output
    # The crashed try is retried and finds its prediction again instead of creating another.
    assert "simulated worker death right after creating" in output
    assert re.search(
        r"Prediction \w+ from an earlier try already succeeded|Reattaching to prediction", output
    )
    # The try that died before recording its create is retried into that prediction, found in the list.
    assert "simulated worker death before recording" in output
    assert re.search(
        r"Adopting prediction \w+, created by an earlier try that did not live to record it", output
    )


# --- a real cluster: triggerer killed and restarted, a worker process killed after create ------------


CLUSTER_DAG = '''
import logging
from datetime import timedelta
from airflow.sdk import DAG, task
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
{crashing_operator}

with DAG(dag_id="kontext_cluster_faults", schedule=None, catchup=False,
         default_args={{"retries": 0, "retry_delay": timedelta(0)}}):
    FluxKontextEditOperator.partial(
        task_id="edit", output_format="png", poll_interval=1.0, input_image={image!r}
    ).expand(prompt=["cluster edit 0", "cluster edit 1"])
    DiesRightAfterCreate(task_id="dies_after_create", mode="exit", retries=1, prompt="cluster dies",
                         input_image={image!r}, output_format="png", poll_interval=1.0)
    FluxKontextEditOperator(task_id="edit_proxy", flux_kontext_conn_id="kontext_proxy",
                            prompt="cluster proxy", input_image={image!r}, output_format="png",
                            poll_interval=1.0)

    @task
    def careless_log():
        """What a careless user or library might log: the masker must hide all the hook registered."""
        for conn_id in ("flux_kontext_default", "kontext_proxy"):
            settings = FluxKontextHook(conn_id).settings
            logging.getLogger("airflow.task").warning(
                "careless: conn=%s token=%s url=%s", conn_id, settings.token, settings.base_url
            )

    careless_log()
'''
PROXY_PASSWORD = "pwClusterCanary4e1a90"
QUERY_TOKEN = "qkClusterCanary/7b+c31"
CLUSTER_SECRETS = [TOKEN, PROXY_PASSWORD, QUERY_TOKEN, quote(QUERY_TOKEN, safe="")]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("cluster-home")
    dags = home / "dags"
    dags.mkdir()
    source = CLUSTER_DAG.format(crashing_operator=CRASHING_OPERATOR, image=_image_uri())
    (dags / "kontext_cluster_faults.py").write_text(source)
    with (
        # 20 s on both: the triggerer kill must find the edits still running. (A trigger firing within
        # seconds of its deferral would race the scheduler, apache/airflow#67287, #72716; the trigger
        # holds such an event for min_defer_seconds: tests/e2e/test_deferral_race.py.)
        FluxKontextEmulator(token=TOKEN, prediction_seconds=20.0, start_seconds=0.5, output_scale=0.1) as api,
        FluxKontextEmulator(
            token=None, path_prefix="/replicate", prediction_seconds=20.0, output_scale=0.1
        ) as proxy,
    ):
        proxy_url = (
            f"http://kontext:{PROXY_PASSWORD}@{proxy.base_url.removeprefix('http://')}"
            f"?key={quote(QUERY_TOKEN, safe='')}"
        )
        extra = {"backoff_base": 0.2, "backoff_max": 1}
        connections = {
            "flux_kontext_default": {
                "conn_type": "fluxkontext",
                "host": api.base_url,
                "password": TOKEN,
                "extra": extra,
            },
            "kontext_proxy": {"conn_type": "fluxkontext", "host": proxy_url, "extra": extra},
        }
        env = cluster_env(home, dags, connections, AIRFLOW__LOGGING__LOGGING_LEVEL="DEBUG")
        cluster = Cluster(home, env)
        cluster.cli("db", "migrate")
        try:
            for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
                cluster.start(name)
            cluster.wait_for(
                "the DAG to be parsed",
                lambda: bool(cluster.query("select 1 from dag where dag_id = 'kontext_cluster_faults'")),
                120,
            )
            cluster.cli("dags", "trigger", "kontext_cluster_faults")

            reads_when_deferred: list[int] = []

            def deferred_and_polled() -> bool:
                # Both mapped edits are in the triggerer, and it has read their status since.
                if not reads_when_deferred:
                    if cluster.deferred("kontext_cluster_faults", "edit") == 2:
                        reads_when_deferred.append(status_reads(api.requests))
                    return False
                return status_reads(api.requests) > reads_when_deferred[0]

            cluster.wait_for(
                "the mapped edits deferred and polled by the triggerer", deferred_and_polled, 180
            )
            cluster.kill("triggerer")
            requests_at_kill = len(api.requests)
            time.sleep(2)
            cluster.start("triggerer")

            def finished() -> bool:
                rows = cluster.query("select state from dag_run where dag_id = 'kontext_cluster_faults'")
                return bool(rows) and rows[0][0] in ("success", "failed")

            cluster.wait_for("the run to finish", finished, 240)
            tis = {
                (task_id, map_index): (state, try_number)
                for task_id, map_index, state, try_number in cluster.query(
                    "select task_id, map_index, state, try_number from task_instance "
                    "where dag_id = 'kontext_cluster_faults'"
                )
            }
        finally:
            cluster.stop_all()
        yield {
            "api": api,
            "proxy": proxy,
            "home": home,
            "tis": tis,
            "requests_at_kill": requests_at_kill,
        }


def test_real_cluster_survives_a_triggerer_restart_and_a_worker_death(cluster_run: dict[str, Any]) -> None:
    api, proxy, tis = cluster_run["api"], cluster_run["proxy"], cluster_run["tis"]
    assert tis == {
        ("edit", 0): ("success", 1),
        ("edit", 1): ("success", 1),
        ("dies_after_create", -1): ("success", 2),
        ("edit_proxy", -1): ("success", 1),
        ("careless_log", -1): ("success", 1),
    }
    assert len(api.requests) > cluster_run["requests_at_kill"]  # the new triggerer polled again
    prompts = sorted(record.prompt for record in api.predictions.values())
    assert prompts == ["cluster dies", "cluster edit 0", "cluster edit 1"]  # one each, none twice
    assert api.created_count == 3
    assert all(api.prediction(pid).status.value == "succeeded" for pid in api.predictions)
    assert proxy.created_count == 1
    task_logs = "\n".join(p.read_text(errors="replace") for p in cluster_run["home"].glob("logs/**/*.log"))
    assert "Reattaching to prediction" in task_logs  # the second try found the first one's prediction


#: Lines of the scheduler's console that echo a task's own log lines (LocalExecutor runs its
#: supervisors with ``subprocess_logs_to_stdout=True``, and that echo is not masked): the probe task's
#: deliberate careless log, and urllib3's DEBUG request line quoting a proxy URL's query.
SCHEDULER_ECHO = re.compile(
    r"\[(warning|debug)\s*\] (careless: conn=|http://127\.0\.0\.1:\d+ \"[A-Z]+ /replicate/\S*\?key=)"
)


def test_real_cluster_shows_no_secret_anywhere(cluster_run: dict[str, Any]) -> None:
    """Check that no secret shows in any log, output, database row or file of a run at DEBUG.

    With real components at DEBUG, no secret shows in any task or trigger log file, in the
    triggerer's, dag-processor's or api-server's output, in the metadata DB or in any other file; and
    a careless log of the hook's settings is masked in the task log, proving every secret (the URL's
    parts too) reached Airflow's masker.

    Upstream, and asserted precisely: Airflow 3.3.2's LocalExecutor also echoes every task log line
    to the scheduler's stdout (``subprocess_logs_to_stdout=True`` in ``executors/local_executor.py``)
    without the masker, so whatever a task logs (the probe's careless line, urllib3's DEBUG request
    line) shows there in clear: even a connection password Airflow registered itself.
    """
    home = cluster_run["home"]
    checked = []
    echoed = []
    for path in home.rglob("*"):
        if path.is_file() and path.suffix != ".py":
            data = path.read_bytes()
            checked.append(path.name)
            for secret in CLUSTER_SECRETS:
                if secret.encode() not in data:
                    continue
                assert path.name == "scheduler.log", f"{secret!r} in {path}"
                lines = [line for line in data.decode(errors="replace").splitlines() if secret in line]
                unexplained = [line for line in lines if not SCHEDULER_ECHO.search(line)]
                assert unexplained == [], "\n".join(line[:400] for line in unexplained)
                echoed.extend(lines)
    print(f"scheduler stdout echo lines holding a secret (upstream, unmasked): {len(set(echoed))}")
    assert "airflow.db" in checked
    assert any(name.endswith(".log") and "trigger" in name for name in checked), checked  # trigger logs
    task_logs = [p.read_text(errors="replace") for p in home.glob("logs/**/*.log")]
    careless = [line for text in task_logs for line in text.splitlines() if "careless: conn=" in line]
    assert len(careless) == 2, careless
    assert all("***" in line for line in careless)
    assert any("debug" in text.lower() for text in task_logs)  # DEBUG was really on
