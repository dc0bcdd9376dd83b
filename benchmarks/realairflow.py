"""Scenario 6: through a real Airflow. N mapped, deferrable ``FluxKontextEditOperator`` edits (retries
2, the default ``retry_delay``) in one DAG run of a LocalExecutor cluster on sqlite (scheduler,
dag-processor, triggerer and api-server as separate processes, ``tests/e2e/cluster.py``) against the
emulator at Replicate's limits and realistic timing; beside it the same edits created and awaited by
one plain process with the hook (what Airflow's overhead costs).

Per run: wall time from the DAG run's start to the last success beside the bound (N/10 s of creates
at 600/min + one model run), the first pass (until every edit's first try ended), tries > 1, tries
failed by the deferral race (Airflow's "state mismatch" log), predictions per edit, failed creates,
each edit's time from its first start to its success, and the CPU of each component's process tree
per edit. ``hold`` is the operator's ``min_defer_seconds`` (``default``: its default; ``0``: resume as
soon as the prediction ends, as the provider did before; ``wait``: the default with ``wait_seconds=60``,
so an edit finished within the create does not defer at all), or a control: the same mapped task run
by a tiny Airflow-only operator, to show what Airflow itself costs per task beside the provider
(``airflow-defer``: defers to Airflow's ``TimeDeltaTrigger`` for the model's run time, two task
starts, may meet the deferral race; ``airflow-defer-held``: the same for the default hold's 15 s,
no race; ``airflow-run``: does nothing, one task start; ``airflow-start-from-trigger``: starts in
the triggerer, one task start). :mod:`benchmarks.realairflow_dags` writes the DAG files.

The size is chosen on the command line (``python -m benchmarks --only realairflow --airflow-sizes
300 --airflow-slots 16 --airflow-repeats 5``); ``make bench`` runs N = 100 at 16 and 32 slots.
The plain process is :mod:`benchmarks.hookonly`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, compile_bytecode, percentile
from benchmarks.hookonly import (
    CREATES_PER_SECOND,
    PREDICTION_SECONDS,
    SPREAD,
    START_SECONDS,
    bound_seconds,
    predictions_of,
    run_plain,
)
from benchmarks.realairflow_dags import CONTROLS, DAG_ID, dag_text

PROXIES = ("http_proxy", "https_proxy", "all_proxy")
COMPONENTS = ("workers", "scheduler", "api-server", "triggerer", "dag-processor")


@dataclass
class AirflowRun:
    n: int
    slots: int
    hold: str
    wall_s: float | None
    first_pass_s: float | None
    bound_s: float
    states: dict[str, int]
    tries_over_1: int
    race_failures: int
    start_failures: int
    predictions: int
    duplicated_prompts: int
    failed_creates: int
    edit_p50_s: float | None
    edit_p95_s: float | None
    cpu_ms_per_edit: dict[str, float] = field(default_factory=dict)
    load_before: float = 0.0
    #: Whether the task processes loaded compiled bytecode (``.pyc``), as a pip install has.
    bytecode: bool = True
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.wall_s is None else self.wall_s / self.bound_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _when(text: str | None) -> float | None:
    if not text:
        return None
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _cpu(process: Any, *, children: bool) -> float:
    times = process.cpu_times()
    total = float(times.user + times.system)
    return total + float(times.children_user + times.children_system) if children else total


def component_cpu(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far of each component's process tree (reaped children included); the
    scheduler's LocalExecutor workers (and the task processes they reaped) count as ``workers``.
    """
    import psutil

    out = dict.fromkeys(COMPONENTS, 0.0)
    for name, popen in procs.items():
        try:
            root = psutil.Process(popen.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                title = " ".join(proc.cmdline())
                # Alive descendants are counted alone; their reaped children are in their times.
                seconds = _cpu(proc, children=True) if proc is not root else _cpu(proc, children=False)
            except psutil.NoSuchProcess:
                continue
            is_worker = name == "scheduler" and ("LocalExecutor" in title or "worker" in title)
            out["workers" if is_worker else name] += seconds
    return out


def _failed_creates(home: Path, dag_id: str, run_id: str) -> int:
    """Tries whose create failed for good on a 429 (their log names the rate-limit error)."""
    count = 0
    for log in (home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/**/attempt=*.log"):
        if "FluxKontextRateLimitError" in log.read_text(errors="replace"):
            count += 1
    return count


def measure(cluster: Any, emu: Any, n: int, slots: int, hold: str, timeout: float) -> AirflowRun:
    """Trigger one run of the benchmark DAG for ``n`` edits and ``hold`` and collect its figures."""
    dag_id = DAG_ID.format(n=n, hold=hold)
    emu.reset()
    load = os.getloadavg()[0]
    cpu_before = component_cpu(cluster.procs)
    run_id = f"bench_{time.time_ns()}"  # the DAG may run more than once: every query names the run
    cluster.cli("dags", "trigger", dag_id, "--run-id", run_id)

    def done() -> bool:
        rows = cluster.query(
            "select count(*) from task_instance where dag_id = ? and run_id = ? and task_id = 'edit' "
            "and state in ('success', 'failed', 'upstream_failed', 'skipped')",
            dag_id,
            run_id,
        )
        return bool(rows) and int(rows[0][0]) == n

    error = None
    try:
        cluster.wait_for(f"{n} edits of {dag_id}", done, timeout)
    except AssertionError as exc:
        error = str(exc).splitlines()[0]
    cpu = component_cpu(cluster.procs)
    run_start = cluster.query(
        "select start_date from dag_run where dag_id = ? and run_id = ?", dag_id, run_id
    )
    tis = cluster.query(
        "select map_index, state, try_number, start_date, end_date from task_instance "
        "where dag_id = ? and run_id = ? and task_id = 'edit'",
        dag_id,
        run_id,
    )
    history = cluster.query(
        "select map_index, try_number, start_date, end_date from task_instance_history "
        "where dag_id = ? and run_id = ? and task_id = 'edit'",
        dag_id,
        run_id,
    )
    mismatches = cluster.query(
        "select map_index, dttm, extra from log where dag_id = ? and run_id = ? and event = 'state mismatch'",
        dag_id,
        run_id,
    )
    # "finished with state success" is the deferral race; "failed" a try that never started (the
    # worker's calls to the api-server timed out on an overloaded machine).
    race = [row for row in mismatches if "finished with state success" in str(row[2])]
    start = _when(run_start[0][0]) if run_start else None
    first_start: dict[int, float] = {}
    first_end: dict[int, float] = {}
    for map_index, failed_at, _ in mismatches:  # such a try may leave no history row
        first_end[map_index] = _when(failed_at) or 0.0
    for map_index, try_number, started, ended in history:
        if try_number == 1:
            first_start[map_index] = _when(started) or 0.0
            first_end[map_index] = _when(ended) or 0.0
    ends, edits = [], []
    for map_index, state, try_number, started, ended in tis:
        end = _when(ended)
        if try_number == 1 and end is not None:
            first_end[map_index] = end
            first_start.setdefault(map_index, _when(started) or end)
        if state == "success" and end is not None:
            ends.append(end)
            edits.append(end - first_start.get(map_index, _when(started) or end))
    predictions, duplicated = predictions_of(emu)
    return AirflowRun(
        n=n,
        slots=slots,
        hold=hold,
        wall_s=max(ends) - start if start and len(ends) == n else None,
        first_pass_s=max(first_end.values()) - start if start and len(first_end) == n else None,
        bound_s=bound_seconds(n),
        states=dict(Counter(state for _, state, *_ in tis)),
        tries_over_1=sum(1 for _, _, try_number, *_ in tis if try_number > 1),
        race_failures=len(race),
        start_failures=len(mismatches) - len(race),
        predictions=predictions,
        duplicated_prompts=duplicated,
        failed_creates=_failed_creates(cluster.home, dag_id, run_id),
        edit_p50_s=percentile(edits, 50) if edits else None,
        edit_p95_s=percentile(edits, 95) if edits else None,
        cpu_ms_per_edit={name: round((cpu[name] - cpu_before[name]) / n * 1000, 1) for name in COMPONENTS},
        load_before=round(load, 2),
        error=error,
    )


def run_cluster(
    slots: int, sizes: tuple[int, ...], holds: tuple[str, ...], repeats: int, bytecode: bool = True
) -> list[AirflowRun]:
    """One cluster with ``slots`` worker slots (parallelism and max_active_tasks_per_dag); every
    (size, hold) ``repeats`` times, one DAG run after another. ``bytecode``: the packages compiled
    first, as a pip install leaves them; else every process compiles what it imports from source.
    """
    sys.path.insert(0, str(ROOT))
    from airflow_provider_kontext.testing.emulator import FluxKontextEmulator
    from tests.e2e.cluster import Cluster, cluster_env

    if bytecode:
        print(f"  bytecode compiled in {compile_bytecode():.1f} s", flush=True)
    root = Path(tempfile.mkdtemp(prefix="kontext-bench-airflow-"))
    runs: list[AirflowRun] = []
    try:
        with FluxKontextEmulator(
            prediction_seconds=PREDICTION_SECONDS,
            start_seconds=START_SECONDS,
            spread=SPREAD,
            output_scale=0.02,
            rate_limit="replicate",
        ) as emu:
            home, dags = root / "home", root / "dags"
            home.mkdir()
            dags.mkdir()
            for n in sizes:
                for hold in holds:
                    (dags / f"{DAG_ID.format(n=n, hold=hold)}.py").write_text(dag_text(n, hold))
            env = cluster_env(
                home,
                dags,
                {"flux_kontext_default": {"conn_type": "fluxkontext", "host": emu.base_url}},
                AIRFLOW__CORE__PARALLELISM=str(slots),
                AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=str(slots),
                AIRFLOW__CORE__MAX_MAP_LENGTH=str(max(1024, *sizes)),
                # Without bytecode: look for .pyc files where there are none; write none.
                **(
                    {}
                    if bytecode
                    else {"PYTHONPYCACHEPREFIX": str(root / "no-pyc"), "PYTHONDONTWRITEBYTECODE": "1"}
                ),
            )
            env = {key: value for key, value in env.items() if key.lower() not in PROXIES}
            env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
            cluster = Cluster(home, env)
            try:
                cluster.cli("db", "migrate")
                for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
                    cluster.start(name)
                want = len(sizes) * len(holds)
                cluster.wait_for(
                    "the benchmark DAGs parsed",
                    lambda: (
                        bool(rows := cluster.query("select count(*) from dag where is_stale = 0"))
                        and int(rows[0][0]) >= want
                    ),
                    240,
                )
                time.sleep(5)  # the api-server answers and the triggerer runs
                for _ in range(repeats):
                    for n in sizes:
                        for hold in holds:
                            timeout = n / CREATES_PER_SECOND + 900
                            one = measure(cluster, emu, n, slots, hold, timeout)
                            one.bytecode = bytecode
                            print(f"  {_line(one)}", flush=True)
                            runs.append(one)
            finally:
                cluster.stop_all()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return runs


def run(
    sizes: tuple[int, ...] = (100,),
    slots: tuple[int, ...] = (16, 32),
    holds: tuple[str, ...] = ("default",),
    repeats: int = 1,
    bytecode: tuple[bool, ...] = (True,),
) -> dict[str, Any]:
    """Every cluster (one per slot count and bytecode choice) and the plain process at each size."""
    runs = [
        one
        for compiled in bytecode
        for count in slots
        for one in run_cluster(count, sizes, holds, repeats, compiled)
    ]
    plains = []
    for n in sizes:
        for count in slots:
            result = run_plain(n, count)
            print(f"  plain N={n} x{count}: {result}", flush=True)
            plains.append(result)
    return {"runs": [r.to_json() for r in runs], "plain": plains}


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _per_edit(row: dict[str, Any]) -> str:
    """Return the predictions per edit, ``-`` for a control (it makes none)."""
    return "-" if row["hold"] in CONTROLS else f"{row['predictions'] / row['n']:.2f}"


def _hold(hold: str, bytecode: bool) -> str:
    return hold if bytecode else f"{hold} (no .pyc)"


def _line(r: AirflowRun) -> str:
    return (
        f"N={r.n} slots={r.slots} hold={_hold(r.hold, r.bytecode)}: wall {_num(r.wall_s)} s "
        f"({_num(r.ratio, 1)}x bound "
        f"{r.bound_s:.0f} s), first pass {_num(r.first_pass_s)} s, tries>1 {r.tries_over_1}, race "
        f"{r.race_failures}, not started {r.start_failures}, predictions "
        f"{'-' if r.hold in CONTROLS else r.predictions}, "
        f"failed creates {r.failed_creates}, "
        f"{r.states}, load {r.load_before}{'; ' + r.error if r.error else ''}"
    )


def section(result: dict[str, Any]) -> list[str]:
    """The report's section (markdown lines)."""
    out = [
        "## 7. Through a real Airflow (LocalExecutor cluster)",
        "",
        "N mapped deferrable edits (retries 2, default `retry_delay` 300 s) in one DAG run of a "
        "LocalExecutor cluster on sqlite (scheduler, dag-processor, triggerer, api-server as separate "
        "processes), against the emulator at Replicate's limits (600 creates/min) and realistic timing "
        "(0.6 s starting + 4 s processing, spread 0.5). Slots = `[core] parallelism` = "
        "`max_active_tasks_per_dag`. Bound = N/10 s + 4.6 s. Hold = the operator's `min_defer_seconds` "
        "(`default`: `[workers] min_heartbeat_interval` + 10 s; `0`: resume at once; `wait`: the default "
        "with `wait_seconds=60`, an edit done within the create does not defer). Controls, the same mapped "
        "task run by a tiny operator in the DAG file with no provider code (what Airflow itself costs "
        "per task): `airflow-defer` defers to Airflow's `TimeDeltaTrigger` for 4.6 s and resumes (two "
        "task starts, no hold: may meet the deferral race), `airflow-defer-held` the same for 15 s (as "
        "long as the default hold, no race), `airflow-run` does nothing (one task start), "
        "`airflow-start-from-trigger` is deferred by the scheduler straight to the triggerer for 4.6 s "
        "(one task start, the resume); they make no predictions (`-`). Race = tries failed "
        'with "finished with state success, but the task instance\'s state attribute is ...". Not started '
        "= tries failed so with state failed: the worker's calls to an overloaded api-server timed out "
        "before the task ran. Edit = from an edit's first start to its success. CPU in ms per edit of "
        "each process tree. Load = "
        "1-minute load average before the run (the machine is shared).",
        "",
        "| N | slots | hold | wall s | x bound | first pass s | tries > 1 | race | not started | "
        "predictions/edit | "
        "failed creates | edit p50/p95 s | CPU ms/edit: workers, scheduler, api-server, triggerer, "
        "dag-processor | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        cpu = row["cpu_ms_per_edit"]
        out.append(
            f"| {row['n']} | {row['slots']} | {_hold(row['hold'], row.get('bytecode', True))} | "
            f"{_num(row['wall_s'])} | "
            f"{_num(row['ratio'], 1)} | {_num(row['first_pass_s'])} | {row['tries_over_1']} | "
            f"{row['race_failures']} | {row.get('start_failures', '-')} | "
            f"{_per_edit(row)} | {row['failed_creates']} | "
            f"{_num(row['edit_p50_s'], 1)}/{_num(row['edit_p95_s'], 1)} | "
            f"{', '.join(_num(cpu.get(name), 0) for name in COMPONENTS)} | {row['load_before']} |"
        )
    out += [
        "",
        "The same edits from one plain process with the async hook (creates `concurrency` at a time, "
        "each wait polling every second):",
        "",
        "| N | concurrency | wall s | x bound | predictions/edit | failed creates | CPU ms/edit |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["plain"]:
        wall = row.get("wall_s")
        out.append(
            f"| {row['n']} | {row['concurrency']} | {_num(wall)} | "
            f"{_num(None if wall is None else wall / row['bound_s'], 1)} | "
            f"{row['predictions'] / row['n']:.2f} | {row.get('failed_creates', '-')} | "
            f"{_num(row.get('cpu_ms_per_edit'), 1)} |"
        )
    return [*out, ""]
