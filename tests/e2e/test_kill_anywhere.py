"""Test SIGKILLs of the task's process at random instants over the whole life of an edit.

Kill anywhere: SIGKILL the task's process at random instants over the whole life of an edit, in a
real Airflow (LocalExecutor, separate scheduler, dag-processor, api-server and triggerer) against
the emulator on 127.0.0.1, and check that every edit still ends succeeded, with exactly one
prediction and its own outputs.

How the kills are spread: the DAG's operator is the real one with markers (``KillableEdit``): it
appends ``(pid, run, map index, try, phase, time)`` to a journal file as it enters each phase of an
edit and dwells there a moment, so a kill can land inside even the short windows (between the
create's answer and the ledger's record, for one). The emulator holds each create and each output
download for a moment, so kills also land while a create or a download is in flight. A killer
thread watches the scheduler's descendants for task processes (titled ``airflow worker -- <ti id>``
by the Task SDK, and checked to belong to this cluster's metadata DB) and the journal; at the first
sight of a process and at each phase marker it plans, with probability :data:`HAZARD` (less for the
phases already planned most often), one SIGKILL at a uniformly random instant within that phase's
window. The phase a kill hit is the last marker that
process wrote before the kill (none: it was still starting). DAG runs of :data:`EDITS` mapped edits
follow one another until :data:`TARGET_KILLS` kills were made.

The report (per phase the kills, then predictions per edit, lost edits, duplicates, tries) is
printed and written to ``$KILLANYWHERE_REPORT`` (default: ``killanywhere-report.md`` in the test's
temporary folder). Not run by default; one command::

    .venv/bin/python -m pytest -m killanywhere -s tests/e2e/test_kill_anywhere.py

``KILLANYWHERE_KILLS``, ``KILLANYWHERE_EDITS`` and ``KILLANYWHERE_SEED`` override the kill target,
edits per DAG run and the killer's seed.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_provider_kontext.testing import faults
from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env
from .conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.killanywhere, pytest.mark.timeout(3600)]

TOKEN = "r8_KillAnywhere_Canary_5e02b7"
DAG_ID = "kontext_kill_anywhere"
TARGET_KILLS = int(os.environ.get("KILLANYWHERE_KILLS", "200"))
EDITS = int(os.environ.get("KILLANYWHERE_EDITS", "10"))
SEED = int(os.environ.get("KILLANYWHERE_SEED", "19"))
#: Chance of planning a kill at each phase a live, not yet doomed, task process enters (for the
#: phases with the fewest kills planned; see ``Killer._plan``).
HAZARD = 0.4
#: Kills of one edit at most (its retries are more than that, so kills alone cannot exhaust them).
KILLS_PER_EDIT = 20
RETRIES = 40
#: Seconds the operator dwells at each marker (but ``create_sent``: the emulator holds the create).
DWELL = 0.5
#: Seconds the emulator holds each create before and after creating, and each output download.
CREATE_HOLD = 0.4
DOWNLOAD_HOLD = 0.5
#: Per phase (the process's last marker before the kill): what it means, and the window after the
#: marker in which a kill planned at that marker lands (uniformly).
PHASES: dict[str, tuple[str, float]] = {
    "startup": ("task process starting (before execute or execute_complete)", 2.0),
    "start": ("execute: before the create (inputs checked, reattach ledger read)", DWELL),
    "create_sent": ("during the create (request in flight, held by the emulator)", 2 * CREATE_HOLD),
    "created": ("after the create answered, before the id is recorded", DWELL),
    "recorded": ("after the id is recorded, before deferring", DWELL),
    "deferring": ("while deferring (trigger handed over, process exiting)", DWELL + 0.3),
    "resumed": ("resumed from the trigger, before the outputs are saved", DWELL + DOWNLOAD_HOLD),
    "reattached": ("retry reattached to its prediction, before the outputs are saved", DWELL + 0.5),
    "adopted": ("retry found its unrecorded prediction in the list, before deferring", DWELL),
    "saved": ("outputs saved, before the result is pushed", DWELL),
    "pushed": ("result pushed (XCom, ledger done), before Airflow records success", DWELL + 0.3),
}

#: The title the Task SDK gives a task process: ``airflow worker -- <task instance id>``.
TASK_TITLE = re.compile(r"^airflow worker -- ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")

DAG = '''
import json
import os
import time
from datetime import timedelta

from airflow.sdk import DAG
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

JOURNAL = {journal!r}
DWELL = {dwell!r}


def mark(ti, phase, dwell=True):
    """Append this process's entry into ``phase`` to the journal (one O_APPEND write, which a
    SIGKILL cannot tear), then stay a moment so that a kill can land inside the phase."""
    line = json.dumps({{"pid": os.getpid(), "run": ti.run_id, "map_index": ti.map_index,
                        "try": ti.try_number, "phase": phase, "t": time.time()}})
    fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)
    if dwell:
        time.sleep(DWELL)


class KillableEdit(FluxKontextEditOperator):
    """The provider's operator, unchanged but for journal markers at the edges of its phases."""

    def execute(self, context):
        ti = self._ti = context["ti"]
        mark(ti, "start")
        hook = self.hook
        create = hook.create_prediction

        def marked_create(*args, **kwargs):
            mark(ti, "create_sent", dwell=False)
            prediction = create(*args, **kwargs)
            mark(ti, "created")
            return prediction

        hook.create_prediction = marked_create
        return super().execute(context)

    def _start(self, request, ledger):
        started = super()._start(request, ledger)
        mark(self._ti, "recorded")
        return started

    def _reattach(self, ledger, request):
        found = super()._reattach(ledger, request)
        if found is not None:
            mark(self._ti, "reattached")
        return found

    def _adopt(self, context, ledger, request):
        found = super()._adopt(context, ledger, request)
        if found is not None:
            mark(self._ti, "adopted")
        return found

    def _defer(self, prediction, deadline):
        mark(self._ti, "deferring")
        super()._defer(prediction, deadline)

    def execute_complete(self, context, event):
        self._ti = context["ti"]
        mark(self._ti, "resumed")
        return super().execute_complete(context, event)

    def _keep_outputs(self, event, input_name=None):
        result = super()._keep_outputs(event, input_name)
        mark(self._ti, "saved")
        return result

    def _complete(self, context, event):
        result = super()._complete(context, event)
        mark(self._ti, "pushed")
        return result


with DAG(dag_id={dag_id!r}, schedule=None, catchup=False, max_active_tasks=64,
         default_args={{"retries": {retries}, "retry_delay": timedelta(seconds=1)}}):
    KillableEdit.partial(
        task_id="edit",
        prompt="kill anywhere {{{{ run_id }}}} edit {{{{ ti.map_index }}}}",
        input_image={image!r},
        output_format="png",
        poll_interval=0.5,
        output_path={outputs!r} + "/{{{{ run_id }}}}/{{{{ ti.map_index }}}}",
    ).expand(seed=list(range(1, {edits} + 1)))
'''


@dataclass
class Kill:
    """One SIGKILL: of which process and edit, when, and in which phase."""

    pid: int
    ti_id: str
    run: str
    map_index: int
    planned_at: str  # the phase at which the kill was planned
    time: float
    phase: str = "?"  # the phase it hit (the last marker before it)


@dataclass
class Killer:
    """Finds this cluster's task processes and SIGKILLs them as the module docstring says."""

    cluster: Cluster
    journal: Path
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    plans: dict[int, tuple[float, str, str]] = field(default_factory=dict)  # pid -> (when, ti id, phase)
    markers: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: collections.defaultdict(list))
    per_edit: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    planned: collections.Counter[str] = field(default_factory=collections.Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    offset: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def armed(self) -> bool:
        return len(self.kills) + len(self.plans) < TARGET_KILLS

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self._tick()
                time.sleep(0.02)
        except Exception as exc:  # surfaced by the test, which would otherwise hang or pass silently
            self.errors.append(repr(exc))
            raise

    def _task_processes(self) -> dict[int, str]:
        """Return this cluster's task processes (descendants of its scheduler) by pid: their TI id."""
        try:
            scheduler = psutil.Process(self.cluster.procs["scheduler"].pid)
            found = {}
            for proc in scheduler.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if match := TASK_TITLE.match(title.strip()):
                    found[proc.pid] = match.group(1)
            return found
        except psutil.Error:
            return {}

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        with self.journal.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        entries = [json.loads(line) for line in complete.decode().splitlines() if line]
        for entry in entries:
            self.markers[entry["pid"]].append(entry)
        return entries

    def _plan(self, pid: int, ti_id: str, phase: str) -> None:
        """Maybe plan this process's kill within ``phase``.

        Maybe plan this process's kill within ``phase``: with :data:`HAZARD` for the phases that
        had the fewest kills planned so far, less for the others (down to a fifth), so the early
        phases every process passes do not take all the kills.
        """
        if pid in self.plans or not self.armed:
            return
        fewest = min(self.planned[name] for name in PHASES)
        chance = HAZARD * max(0.2, (fewest + 1) / (self.planned[phase] + 1))
        if self.rng.random() >= chance:
            return
        self.planned[phase] += 1
        self.plans[pid] = (time.time() + self.rng.uniform(0, PHASES[phase][1]), ti_id, phase)

    def _tick(self) -> None:
        processes = self._task_processes()
        for pid, ti_id in processes.items():
            if pid not in self.seen:
                self.seen.add(pid)
                self._plan(pid, ti_id, "startup")
        for entry in self._read_journal():
            pid = entry["pid"]
            if pid in processes and entry["phase"] in PHASES:
                self._plan(pid, processes[pid], entry["phase"])
        now = time.time()
        for pid, (when, ti_id, planned_at) in list(self.plans.items()):
            if pid not in processes:  # it ended first: a missed plan, no kill
                del self.plans[pid]
                continue
            if now < when:
                continue
            del self.plans[pid]
            # sqlite holds the UUID as 32 hex digits.
            rows = self.cluster.query(
                "select run_id, map_index from task_instance where id = ?", ti_id.replace("-", "")
            )
            if not rows:  # not one of this cluster's tasks: never touch it
                continue
            run, map_index = rows[0]
            if self.per_edit[(run, map_index)] >= KILLS_PER_EDIT:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.per_edit[(run, map_index)] += 1
            self.kills.append(Kill(pid, ti_id, run, int(map_index), planned_at, time.time()))

    def classify(self) -> None:
        """Name each kill's phase: the last marker its process wrote before the kill."""
        self._read_journal()
        for kill in self.kills:
            before = [m for m in self.markers.get(kill.pid, []) if m["t"] <= kill.time]
            kill.phase = before[-1]["phase"] if before else "startup"


def _image_uri() -> str:
    png = (ROOT / "example_dags" / "images" / "mug.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _local(path: str) -> Path:
    return Path(path.removeprefix("file://"))


@pytest.fixture(scope="module")
def kill_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("kill-anywhere-home")
    dags, outputs = home / "dags", home / "outputs"
    dags.mkdir()
    journal = home / "journal.jsonl"
    (dags / f"{DAG_ID}.py").write_text(
        DAG.format(
            journal=str(journal),
            dwell=DWELL,
            dag_id=DAG_ID,
            retries=RETRIES,
            image=_image_uri(),
            outputs=str(outputs),
            edits=EDITS,
        )
    )
    with FluxKontextEmulator(token=TOKEN, prediction_seconds=3.0, start_seconds=0.3, output_scale=0.1) as api:
        # Creates held before and after the prediction is made; output downloads held too.
        api.faults.slow(CREATE_HOLD, probability=1.0, method="POST", path=faults.CREATE)
        api.faults.slow(
            CREATE_HOLD, probability=1.0, method="POST", path=faults.CREATE, after_processing=True
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
            AIRFLOW__CORE__PARALLELISM="6",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="2",
        )
        cluster = Cluster(home, env)
        cluster.cli("db", "migrate")
        killer = Killer(cluster, journal, random.Random(SEED))
        thread = threading.Thread(target=killer.run, name="killer", daemon=True)
        runs: list[str] = []
        started = time.monotonic()
        try:
            for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
                cluster.start(name)
            cluster.wait_for(
                "the DAG to be parsed",
                lambda: bool(cluster.query("select 1 from dag where dag_id = ?", DAG_ID)),
                180,
            )
            thread.start()
            while killer.armed and len(runs) < 12 and not killer.errors:
                run_id = f"kill-{len(runs) + 1}"
                runs.append(run_id)
                cluster.cli("dags", "trigger", DAG_ID, "--run-id", run_id)

                def finished(run_id: str = run_id) -> bool:
                    rows = cluster.query(
                        "select state from dag_run where dag_id = ? and run_id = ?", DAG_ID, run_id
                    )
                    return bool(rows) and rows[0][0] in ("success", "failed")

                cluster.wait_for(f"DAG run {run_id} to finish", finished, 1800)
            killer.stop.set()
            thread.join(timeout=10)
            killer.classify()
            tis = cluster.query(
                "select run_id, map_index, state, try_number from task_instance where dag_id = ?", DAG_ID
            )
            xcoms = cluster.query(
                "select run_id, map_index, value from xcom where dag_id = ? and key = 'return_value'",
                DAG_ID,
            )
        finally:
            killer.stop.set()
            cluster.stop_all()
        elapsed = time.monotonic() - started
        predictions = {pid: api.prediction(pid) for pid in api.predictions}
        prompts = {pid: record.prompt for pid, record in api.predictions.items()}
        downloads = {
            pid: [urllib.request.urlopen(url, timeout=30).read() for url in p.output_urls or []]
            for pid, p in predictions.items()
        }
    return {
        "tis": tis,
        "xcoms": xcoms,
        "runs": runs,
        "killer": killer,
        "prompts": prompts,
        "predictions": predictions,
        "downloads": downloads,
        "elapsed": elapsed,
        "home": home,
    }


def _report(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return the report's text, and the figures the test asserts on."""
    killer: Killer = data["killer"]
    edits = {(run, int(map_index)): (state, tries) for run, map_index, state, tries in data["tis"]}
    per_prompt = collections.Counter(data["prompts"].values())
    created = {key: per_prompt.get(f"kill anywhere {key[0]} edit {key[1]}", 0) for key in edits}
    lost = sorted(key for key, (state, _) in edits.items() if state != "success")
    duplicates = {key: n for key, n in created.items() if n > 1}
    stray = sorted(set(per_prompt) - {f"kill anywhere {r} edit {m}" for r, m in edits})
    kills_by_phase = collections.Counter(kill.phase for kill in killer.kills)
    duplicate_after = collections.Counter(
        kill.phase for kill in killer.kills if (kill.run, kill.map_index) in duplicates
    )
    lines = [
        f"# Kill anywhere: {len(killer.kills)} SIGKILLs of task processes, {len(edits)} edits "
        f"in {len(data['runs'])} DAG runs, {data['elapsed']:.0f} s (seed {SEED})",
        "",
        "| phase hit (last marker before the kill) | kills | kills of edits that paid twice |",
        "|---|---|---|",
        *(
            f"| {name}: {what} | {kills_by_phase.get(name, 0)} | {duplicate_after.get(name, 0)} |"
            for name, (what, _) in PHASES.items()
        ),
        f"| total | {len(killer.kills)} | {sum(duplicate_after.values())} |",
        "",
        f"- predictions per edit: {dict(sorted(collections.Counter(created.values()).items()))} "
        f"(edit count by number of predictions created for its prompt)",
        f"- lost edits (not succeeded): {len(lost)} {lost[:10]}",
        f"- duplicates (edits with more than one prediction): {len(duplicates)}, "
        f"{sum(n - 1 for n in duplicates.values())} extra predictions {dict(list(duplicates.items())[:10])}",
        f"- predictions for no edit's prompt: {len(stray)}",
        f"- kills per edit: {dict(sorted(collections.Counter(killer.per_edit[k] for k in edits).items()))}",
        f"- tries per edit: {dict(sorted(collections.Counter(t for _, t in edits.values()).items()))}; "
        f"tries beyond kills + 1: {sum(max(0, t - 1 - killer.per_edit[k]) for k, (_, t) in edits.items())}",
        f"- task processes seen: {len(killer.seen)}",
    ]
    causes = collections.Counter(cause for key in edits for cause in _repeat_causes(killer, key))
    lines.append(
        "- creates after an edit's first answered one, by how the last try holding its prediction "
        f"ended: {dict(causes.most_common())}"
    )
    if duplicates:
        lines += ["", "Edits that paid twice, try by try (phases each process entered; KILLED: the kill):"]
        for key in list(duplicates)[:10]:
            lines.append(f"- {key[0]} edit {key[1]}: " + "; ".join(_story(killer, key)))
    return "\n".join(lines), {
        "edits": edits,
        "created": created,
        "lost": lost,
        "duplicates": duplicates,
        "stray": stray,
        "kills_by_phase": kills_by_phase,
    }


#: The phases in which a task process holds a prediction it created or found.
HOLDING = ("created", "recorded", "deferring", "resumed", "reattached", "adopted", "saved", "pushed")


def _repeat_causes(killer: Killer, key: tuple[str, int]) -> list[str]:
    """Return each create of one edit after its first answered one, named by how the process before ended.

    Each create of one edit after its first answered one, named by how the last earlier process
    that held the prediction ended: its last phase, then ``killed`` or ``ended`` (by Airflow, or
    normally: a deferral).
    """
    killed = {kill.pid for kill in killer.kills if (kill.run, kill.map_index) == key}
    processes = sorted(
        (markers[0]["t"], pid, [m["phase"] for m in markers])
        for pid, markers in killer.markers.items()
        if markers and (markers[0]["run"], markers[0]["map_index"]) == key
    )
    causes, holder = [], None
    for _, pid, phases in processes:
        if "create_sent" in phases and holder is not None:
            causes.append(holder)
        if any(phase in HOLDING for phase in phases):
            holder = f"{phases[-1]} {'killed' if pid in killed else 'ended'}"
    return causes


def _story(killer: Killer, key: tuple[str, int]) -> list[str]:
    """Return what each task process of one edit did, in order.

    What each task process of one edit did, in order: its try, the phases it entered, and
    ``KILLED`` if the killer ended it (a process killed before its first marker shows as startup).
    """
    killed = {kill.pid for kill in killer.kills if (kill.run, kill.map_index) == key}
    processes = []
    for pid, markers in killer.markers.items():
        if markers and (markers[0]["run"], markers[0]["map_index"]) == key:
            phases = ">".join(m["phase"] for m in markers)
            note = " KILLED" if pid in killed else ""
            processes.append((markers[0]["t"], f"try {markers[0]['try']}: {phases}{note}"))
    for kill in killer.kills:
        if (kill.run, kill.map_index) == key and kill.pid not in killer.markers:
            processes.append((kill.time, "startup KILLED"))
    return [text for _, text in sorted(processes)]


def test_kill_anywhere(kill_run: dict[str, Any]) -> None:
    text, figures = _report(kill_run)
    target = Path(os.environ.get("KILLANYWHERE_REPORT", kill_run["home"] / "killanywhere-report.md"))
    target.write_text(text + "\n")
    print(f"\n{text}\n(report: {target})")
    killer: Killer = kill_run["killer"]
    assert not killer.errors, killer.errors
    assert len(killer.kills) >= TARGET_KILLS
    # Spread over the whole life of an edit: every phase was hit.
    missing = [name for name in PHASES if figures["kills_by_phase"].get(name, 0) == 0]
    assert missing == [], f"no kill landed in {missing}\n{text}"
    assert figures["lost"] == [], text
    assert figures["duplicates"] == {}, text
    assert figures["stray"] == [], text
    assert all(n == 1 for n in figures["created"].values()), text
    # Each edit's outputs are its own prediction's: the paths name it and hold its bytes.
    by_prompt = {prompt: pid for pid, prompt in kill_run["prompts"].items()}
    outputs = {(run, int(m)): json.loads(v) if isinstance(v, str) else v for run, m, v in kill_run["xcoms"]}
    assert sorted(outputs) == sorted(figures["edits"]), text
    for (run, map_index), paths in outputs.items():
        pid = by_prompt[f"kill anywhere {run} edit {map_index}"]
        assert len(paths) == len(kill_run["downloads"][pid]) > 0, (run, map_index, paths)
        for path, expected in zip(paths, kill_run["downloads"][pid], strict=True):
            assert pid in Path(path).name, (run, map_index, path, pid)
            assert _local(path).read_bytes() == expected, (run, map_index, path)
