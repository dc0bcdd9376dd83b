"""Scenario 6: many edits in one task (``FluxKontextBatchEditOperator``).

1. N images (default 1,000) in one task of a real Airflow cluster (scheduler with LocalExecutor,
   dag-processor, api-server, triggerer as separate processes; tests/e2e/cluster.py) against the
   emulator at Replicate's limits (600 creates/min, 3000 other requests/min) with flux-kontext-dev's
   timing. Measured: wall time from the DAG run's start to its end against the bound (N/10 s of
   creates + one model run), predictions created, Airflow CPU per edit (all of it, and less what the
   idle cluster spends over as long, measured before the runs); beside it, the same batch run
   by the operator in one plain process (no Airflow), whose CPU per edit is the reference; and, in
   the same cluster and benchmark run, the same N edits as mapped single edits (16 slots, retries 2):
   their wall time and Airflow CPU per edit (``--no-mapped`` leaves them out).
2. A big batch (default 10,000) in one plain process, creates unlimited: peak RSS of the worker and of
   the trigger's wait, and the sizes of what Airflow stores (state store values, trigger kwargs,
   event, the return value and every other XCom pushed, by key).

Run: ``.venv/bin/python -m benchmarks.batch [--n 1000] [--big 10000]`` (prints a JSON summary).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import PYTHON, EmulatorProcess, child_env, compile_bytecode, connection_json
from benchmarks.realairflow import component_cpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from cluster import Cluster, cluster_env  # noqa: E402

#: flux-kontext-dev's timing on Replicate (as in section 5).
START_SECONDS, PREDICTION_SECONDS, SPREAD = 0.6, 4.0, 0.5
DAG_ID = "kontext_bench_batch"
FINISHED = "select 1 from dag_run where dag_id = ? and end_date is not null"
RUN_TIME = "select state, (julianday(end_date) - julianday(start_date)) * 86400 from dag_run where dag_id = ?"

DAG = f'''
import pendulum
from airflow.sdk import DAG

from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator

with DAG(dag_id="{DAG_ID}", schedule=None, start_date=pendulum.datetime(2026, 11, 1, tz="UTC")):
    FluxKontextBatchEditOperator(
        task_id="edit_all",
        input_images="{{{{ dag_run.conf['input_dir'] }}}}",
        prompt="Make it look like a watercolour",
        poll_interval=2.0,
        deferrable=True,
    )
'''

MAPPED_DAG_ID = "kontext_bench_mapped"
#: The same edits as mapped single edits (one task instance each), run beside the batch in one cluster.
MAPPED_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
         default_args={{"retries": 2}}):
    FluxKontextEditOperator.partial(
        task_id="edit", prompt="Make it look like a watercolour", poll_interval=2.0, deferrable=True,
        map_index_template="{{{{ task.input_label }}}}",
    ).expand(input_image={images!r})
"""
#: Worker slots of the cluster (``parallelism`` and ``max_active_tasks_per_dag``): the mapped edits'.
SLOTS = 16
#: Seconds over which the idle cluster's CPU is measured before the runs.
IDLE_SECONDS = 20.0

#: The batch in one plain process: the operator's execute with a dict for a state store.
PLAIN = """
import json, resource, sys, time
from unittest import mock
from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator

class Store:
    def __init__(self): self.data, self.largest, self.writes, self.written = {}, 0, 0, 0
    def get(self, key, default=None): return self.data.get(key, default)
    def set(self, key, value, *, retention=None):
        size = len(json.dumps(value))
        self.largest, self.writes = max(self.largest, size), self.writes + 1
        self.written += size
        self.data[key] = value
    def delete(self, key): self.data.pop(key, None)

folder, per_minute = sys.argv[1], float(sys.argv[2])
store, ti = Store(), mock.MagicMock()
op = FluxKontextBatchEditOperator(task_id="t", input_images=folder, prompt="Make it look like a watercolour",
                                  deferrable=False, poll_interval=2.0, creates_per_minute=per_minute,
                                  max_concurrent_creates=8)
started, cpu = time.monotonic(), time.process_time()
result = op.execute({"ti": ti, "task_state_store": store, "outlet_events": mock.MagicMock()})
pushed = {c.kwargs["key"]: c.kwargs["value"] for c in ti.xcom_push.call_args_list}
print(json.dumps({
    "seconds": time.monotonic() - started, "cpu_s": time.process_time() - cpu,
    "edited": sum(1 for outputs in result if outputs),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "largest_store_value_bytes": store.largest,
    "store_writes": store.writes, "store_bytes_written": store.written,
    "return_value_bytes": len(json.dumps(result)),
    "xcom_bytes": {key: len(json.dumps(value)) for key, value in pushed.items()},
    "largest_xcom_bytes": max([len(json.dumps(result))] + [len(json.dumps(v)) for v in pushed.values()]),
}))
"""

#: The trigger's wait over ids already finished: its kwargs, event and peak RSS.
TRIGGER = """
import asyncio, json, resource, sys
from airflow_provider_kontext.triggers.batch import FluxKontextBatchTrigger

ids = sys.stdin.read().split()
trigger = FluxKontextBatchTrigger(",".join(ids), None, None, poll_interval=1.0)
_, kwargs = trigger.serialize()

async def main():
    return [event async for event in trigger.run()]

(event,) = asyncio.run(main())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"kwargs_bytes": len(json.dumps(kwargs)), "event_bytes": len(json.dumps(event.payload)),
                  "event": event.payload, "peak_rss_mb": rss}))
"""


def bound_seconds(n: int) -> float:
    """Return the account's bound for ``n`` edits: N/10 s of creates at 600/min plus one model run."""
    return n / 10 + START_SECONDS + PREDICTION_SECONDS


def _images(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        Image.new("RGB", (32, 32), (number % 256, number // 256 % 256, 90)).save(
            folder / f"shot{number:05d}.png"
        )
    return folder


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and all their descendants (reaped children included)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def _plain(folder: Path, base_url: str, per_minute: float) -> dict[str, Any]:
    env = child_env(AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT=connection_json(base_url))
    out = subprocess.run(
        [PYTHON, "-c", PLAIN, str(folder), str(per_minute)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _mapped_run(cluster: Any, emu: Any, pids: list[int], n: int, idle_rate: float) -> dict[str, Any]:
    """Run the same edits as N mapped single edits in the same cluster; return their figures."""
    cpu_before = _tree_cpu(pids)
    cluster.cli("dags", "trigger", MAPPED_DAG_ID)
    cluster.wait_for("the mapped run", lambda: bool(cluster.query(FINISHED, MAPPED_DAG_ID)), n * 3 + 600)
    cpu = _tree_cpu(pids) - cpu_before
    ((state, seconds),) = cluster.query(RUN_TIME, MAPPED_DAG_ID)
    states = dict(
        cluster.query(
            "select state, count(*) from task_instance where dag_id = ? group by state", MAPPED_DAG_ID
        )
    )
    ((retried,),) = cluster.query(
        "select count(*) from task_instance where dag_id = ? and try_number > 1", MAPPED_DAG_ID
    )
    bound = bound_seconds(n)
    return {
        "state": state,
        "task_states": states,
        "tries_over_1": retried,
        "wall_s": round(seconds, 1),
        "wall_over_bound": round(seconds / bound, 2),
        "created": int(emu.state()["created_count"]),
        "airflow_cpu_s": round(cpu, 1),
        "airflow_cpu_ms_per_edit": round(cpu / n * 1000, 1),
        "airflow_cpu_ms_per_edit_less_idle": round((cpu - idle_rate * seconds) / n * 1000, 1),
    }


def cluster_case(n: int, work: Path, *, mapped: bool = True) -> dict[str, Any]:
    folder = _images(work / "shots", n)
    rate = "--rate-limit", "replicate"
    with EmulatorProcess(
        prediction_seconds=PREDICTION_SECONDS,
        start_seconds=START_SECONDS,
        extra_args=("--spread", str(SPREAD), *rate),
    ) as emu:
        home = work / "home"
        dags = home / "dags"
        dags.mkdir(parents=True)
        (dags / f"{DAG_ID}.py").write_text(textwrap.dedent(DAG))
        if mapped:
            images = sorted(str(path) for path in folder.iterdir())
            (dags / f"{MAPPED_DAG_ID}.py").write_text(MAPPED_DAG.format(dag_id=MAPPED_DAG_ID, images=images))
        connection = {"conn_type": "fluxkontext", "host": emu.base_url}
        slots = {
            "AIRFLOW__CORE__PARALLELISM": str(SLOTS),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(SLOTS),
        }
        cluster = Cluster(home, cluster_env(home, dags, {"flux_kontext_default": connection}, **slots))
        compile_bytecode()  # as a pip install leaves the packages (see benchmarks.common)
        cluster.cli("db", "migrate")
        beside: dict[str, Any] = {}
        try:
            for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
                cluster.start(name)
            wanted = [DAG_ID, *([MAPPED_DAG_ID] if mapped else [])]
            cluster.wait_for(
                "the DAGs",
                lambda: all(dag in cluster.cli("dags", "list", "-o", "plain") for dag in wanted),
                300,
            )
            time.sleep(10)  # let start-up settle before the CPU baseline
            pids = [proc.pid for proc in cluster.procs.values()]
            idle_before = _tree_cpu(pids)
            time.sleep(IDLE_SECONDS)  # what the idle cluster spends (heartbeats, parsing) per second
            idle_rate = (_tree_cpu(pids) - idle_before) / IDLE_SECONDS
            cpu_before = _tree_cpu(pids)
            parts_before = component_cpu(cluster.procs)
            cluster.cli("dags", "trigger", DAG_ID, "--conf", json.dumps({"input_dir": str(folder)}))
            cluster.wait_for(
                "the run",
                lambda: bool(cluster.query(FINISHED, DAG_ID)),
                n / 10 * 3 + 600,
            )
            cpu_airflow = _tree_cpu(pids) - cpu_before
            parts = {k: round(v - parts_before[k], 1) for k, v in component_cpu(cluster.procs).items()}
            ((state, seconds),) = cluster.query(RUN_TIME, DAG_ID)
            ((tries,),) = cluster.query("select try_number from task_instance where dag_id = ?", DAG_ID)
            created = int(emu.state()["created_count"])
            if mapped:
                emu.reset()
                beside = _mapped_run(cluster, emu, pids, n, idle_rate)
        finally:
            cluster.stop_all()
        emu.reset()
        plain = _plain(folder, emu.base_url, 600)
        plain_created = int(emu.state()["created_count"])
    bound = bound_seconds(n)
    return {
        "n": n,
        "state": state,
        "tries": tries,
        "wall_s": round(seconds, 1),
        "bound_s": bound,
        "wall_over_bound": round(seconds / bound, 2),
        "created": created,
        "airflow_cpu_s": round(cpu_airflow, 1),
        "airflow_cpu_ms_per_edit": round(cpu_airflow / n * 1000, 1),
        "airflow_cpu_s_by_process": parts,
        "idle_cpu_per_s": round(idle_rate, 3),
        "airflow_cpu_ms_per_edit_less_idle": round((cpu_airflow - idle_rate * seconds) / n * 1000, 1),
        "plain": plain,
        "plain_created": plain_created,
        "plain_cpu_ms_per_edit": round(plain["cpu_s"] / n * 1000, 1),
        "cpu_ratio": round(cpu_airflow / max(plain["cpu_s"], 1e-9), 1),
        "mapped": beside
        and {**beside, "cpu_ratio": round(beside["airflow_cpu_s"] / max(plain["cpu_s"], 1e-9), 1)},
    }


def big_case(n: int, work: Path) -> dict[str, Any]:
    folder = _images(work / "big", n)
    with EmulatorProcess(
        prediction_seconds=PREDICTION_SECONDS,
        start_seconds=START_SECONDS,
        extra_args=("--spread", str(SPREAD)),
    ) as emu:
        plain = _plain(folder, emu.base_url, 100_000)
        ids = [p["id"] for p in _all_predictions(emu.base_url)]
        env = child_env(AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT=connection_json(emu.base_url))
        out = subprocess.run(
            [PYTHON, "-c", TRIGGER],
            input="\n".join(ids),
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        trigger = json.loads(out.stdout.strip().splitlines()[-1])
    return {"n": n, "worker": plain, "trigger": trigger, "predictions": len(ids)}


def _all_predictions(base_url: str) -> list[dict[str, Any]]:
    import requests

    found, url = [], f"{base_url}/v1/predictions"
    with requests.Session() as session:
        session.trust_env = False
        while url:
            page = session.get(url, timeout=60).json()
            found += [{"id": item["id"]} for item in page["results"]]
            url = page.get("next")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument(
        "--no-mapped", action="store_true", help="leave out the mapped edits beside the batch"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kontext-bench-batch-") as tmp:
        if not args.skip_cluster:
            results["cluster"] = cluster_case(args.n, Path(tmp) / "cluster", mapped=not args.no_mapped)
            print(json.dumps(results["cluster"]), flush=True)
        if args.big:
            results["big"] = big_case(args.big, Path(tmp) / "big")
            print(json.dumps(results["big"]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
