"""The edits a DAG run recorded, read from Airflow's metadata DB for the plugin's pages.

An edit is what a task left in XCom: the ``prediction`` summary of the operator or the sensor, each
row of a batch's ``predictions`` (with its ``predictions_1``, ... parts and the fields its ``batch``
XCom holds for every row), or, for a task that started a
prediction but never finished it (failed, still waiting), its ``prediction_id`` and
``prediction_web_url`` with the inputs Airflow rendered for it. Nothing here reads a request
parameter as a path: pages and images are found by (DAG, run, task, map index, edit number) and
take every file location from these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_kontext.edits.batch_results import HEADER_KEY, ROWS_KEY, joined_rows

#: The XCom keys an edit may leave (see the module docstring).
SUMMARY_KEY = "prediction"
BATCH_KEY = ROWS_KEY
ID_KEY = "prediction_id"
WEB_URL_KEY = "prediction_web_url"
KEYS = (SUMMARY_KEY, BATCH_KEY, HEADER_KEY, ID_KEY, WEB_URL_KEY)
#: The rendered fields a started edit's inputs are read from while it has no summary.
RENDERED_INPUTS = ("prompt", "input_image", "model", "seed")
#: Most edits the recent list reads (newest first).
RECENT_LIMIT = 200


@dataclass(frozen=True)
class TaskKey:
    """Where an edit is: a task instance of a run (``map_index`` -1 when the task is not mapped)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1


@dataclass
class Edit:
    """One edit as the pages show it.

    The task instance, the number of the edit in it, and what its task recorded (``summary``: the
    ``prediction`` dict, or what is known of an unfinished one).
    """

    key: TaskKey
    number: int
    summary: dict[str, Any]
    task_state: str | None = None
    label: str | None = None
    finished: bool = True
    when: datetime | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``succeeded``, ``failed``, ... as the prediction ended; else the task's state."""
        status = self.summary.get("status")
        if isinstance(status, str) and status:
            return status
        return str(self.task_state or "unknown")

    @property
    def name(self) -> str:
        """What the edit is called on a page: its input's name, the task's label, or its place."""
        for candidate in (self.summary.get("input_name"), self.label):
            if isinstance(candidate, str) and candidate:
                return candidate
        suffix = f"[{self.key.map_index}]" if self.key.map_index >= 0 else ""
        return f"{self.key.task_id}{suffix}" + (f" #{self.number + 1}" if self.number else "")

    def outputs(self) -> list[str]:
        """Where the outputs are (saved paths, or URLs while Replicate keeps them)."""
        outputs = self.summary.get("outputs")
        return [str(o) for o in outputs] if isinstance(outputs, list) else []

    def urls_expired(self, now: datetime | None = None) -> bool:
        """Whether Replicate has deleted this edit's output files (its ``urls_expire_at`` passed)."""
        expires = self.summary.get("urls_expire_at")
        if not isinstance(expires, str):
            return False
        try:
            moment = datetime.fromisoformat(expires)
        except ValueError:
            return False
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return (now or datetime.now(timezone.utc)) >= moment


def _summaries(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the finished edits of one task instance, from its XComs."""
    found: list[dict[str, Any]] = []
    if isinstance(values.get(SUMMARY_KEY), dict):
        found.append(values[SUMMARY_KEY])
    found.extend(joined_rows(values.get(HEADER_KEY), values))
    return found


def _edit_keys(column: Any, keys: tuple[str, ...]) -> Any:
    """Return the query condition for XCom ``keys`` and the later parts of a batch's rows."""
    from sqlalchemy import or_

    return or_(column.in_(keys), column.like(f"{BATCH_KEY}\\_%", escape="\\"))


def _xcom_value(row: Any) -> Any:
    from airflow.models.xcom import XComModel

    try:
        return XComModel.deserialize_value(row)
    except Exception:  # a value another version wrote: show what the DB holds
        return row.value


def _unfinished(values: dict[str, Any], rendered: dict[str, Any] | None) -> dict[str, Any]:
    """Return what is known of a started edit without a summary: its id and link, the rendered inputs."""
    from airflow_provider_kontext.models.images import trace_image

    summary: dict[str, Any] = {"id": values.get(ID_KEY), "web_url": values.get(WEB_URL_KEY)}
    for name in RENDERED_INPUTS:
        value = (rendered or {}).get(name)
        if name == "input_image":
            where, input_name = trace_image(value) if isinstance(value, str) else (None, None)
            summary.update(input_image=where, input_name=input_name)
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            summary[name] = value
    return summary


def run_edits(
    session: Any, dag_id: str, run_id: str, task_id: str | None = None, map_index: int | None = None
) -> list[Edit]:
    """Return every edit of a run, in task and map index order.

    Of one task, or one task instance, when given.

    Three queries whatever the number of edits: the run's edit XComs, its task instances, and the
    rendered inputs of the task instances that have no summary.
    """
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    query = select(XComModel).where(
        XComModel.dag_id == dag_id, XComModel.run_id == run_id, _edit_keys(XComModel.key, KEYS)
    )
    if task_id is not None:
        query = query.where(XComModel.task_id == task_id)
    if map_index is not None:
        query = query.where(XComModel.map_index == map_index)
    values: dict[tuple[str, int], dict[str, Any]] = {}
    for row in session.scalars(query):
        values.setdefault((row.task_id, row.map_index), {})[row.key] = _xcom_value(row)
    if not values:
        return []
    tis = select(TI.task_id, TI.map_index, TI.state, TI._rendered_map_index).where(
        TI.dag_id == dag_id, TI.run_id == run_id
    )
    if task_id is not None:
        tis = tis.where(TI.task_id == task_id)
    if map_index is not None:
        tis = tis.where(TI.map_index == map_index)
    states = {(t, m): (str(s) if s else None, label) for t, m, s, label in session.execute(tis)}
    open_keys = [key for key, found in values.items() if not _summaries(found)]
    rendered: dict[tuple[str, int], dict[str, Any]] = {}
    if open_keys:
        rows = session.execute(
            select(RTIF.task_id, RTIF.map_index, RTIF.rendered_fields).where(
                RTIF.dag_id == dag_id,
                RTIF.run_id == run_id,
                RTIF.task_id.in_(sorted({t for t, _ in open_keys})),
            )
        )
        rendered = {(t, m): fields for t, m, fields in rows if isinstance(fields, dict)}
    edits: list[Edit] = []
    for (task, index), found in sorted(values.items()):
        state, label = states.get((task, index), (None, None))
        key = TaskKey(dag_id, run_id, task, index)
        summaries = _summaries(found)
        if summaries:
            edits.extend(
                Edit(key, n, summary, state, label if len(summaries) == 1 else None)
                for n, summary in enumerate(summaries)
            )
        elif found.get(ID_KEY):
            summary = _unfinished(found, rendered.get((task, index)))
            edits.append(Edit(key, 0, summary, state, label, finished=False))
    return edits


def task_edits(session: Any, key: TaskKey) -> list[Edit]:
    """Return the edits of one task instance (a few rows whatever the size of the run)."""
    return run_edits(session, key.dag_id, key.run_id, key.task_id, key.map_index)


def recent_edits(session: Any, dag_ids: set[str], limit: int = RECENT_LIMIT) -> list[Edit]:
    """Return the newest finished edits of the DAGs in ``dag_ids``, newest first.

    ``dag_ids`` are those the user may read.
    """
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    if not dag_ids:
        return []
    query = (
        select(XComModel)
        .where(
            _edit_keys(XComModel.key, (SUMMARY_KEY, BATCH_KEY, HEADER_KEY)),
            XComModel.dag_id.in_(sorted(dag_ids)),
        )
        .order_by(XComModel.timestamp.desc())
        .limit(limit)
    )
    # A batch's rows are several XComs (its header, its parts): gathered per task instance.
    values: dict[TaskKey, dict[str, Any]] = {}
    when: dict[TaskKey, datetime] = {}
    for row in session.scalars(query):
        key = TaskKey(row.dag_id, row.run_id, row.task_id, row.map_index)
        values.setdefault(key, {})[row.key] = _xcom_value(row)
        when.setdefault(key, row.timestamp)
    edits: list[Edit] = []
    for key, found in values.items():
        for n, summary in enumerate(_summaries(found)):
            edits.append(Edit(key, n, summary, when=when[key]))
    return edits[:limit]
