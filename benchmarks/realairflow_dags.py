"""DAG files of the real-Airflow benchmark (:mod:`benchmarks.realairflow`), one per (N, hold).

A ``hold`` is either a hold of the provider's ``FluxKontextEditOperator`` (``default``, ``wait`` or a
number of seconds for ``min_defer_seconds``) or one of :data:`CONTROLS`: the same mapped task
(task_id ``edit``, N instances, retries 2, the default ``retry_delay``) run by a tiny operator
defined in the DAG file, with no provider code, so that what Airflow itself costs per task is
measured in the same cluster:

- ``airflow-defer``: ``execute`` defers to Airflow's ``TimeDeltaTrigger`` for the model's run time,
  the resume method returns None (two task starts; no hold, so it may meet the deferral race);
- ``airflow-defer-held``: the same, but the trigger waits :data:`HELD_SECONDS`, as long as the
  operator's default hold makes a deferral last at least (no race);
- ``airflow-run``: ``execute`` does nothing (one task start, no deferral);
- ``airflow-start-from-trigger``: ``start_from_trigger`` with the same trigger as ``airflow-defer``:
  the scheduler defers the task straight to the triggerer, and only the resume starts a task.

:func:`dag_text` raises ``ValueError`` for any other hold, before a cluster is started.
"""

from __future__ import annotations

from benchmarks.common import TINY_PNG
from benchmarks.hookonly import PREDICTION_SECONDS, START_SECONDS

DAG_ID = "kontext_bench_airflow_{n}_{hold}"
# The model's run time in this benchmark: an Airflow-only deferral lasts as long as an edit's.
MODEL_SECONDS = START_SECONDS + PREDICTION_SECONDS
# The least time the operator's default hold makes a deferral last ([workers] min_heartbeat_interval
# at its default 5 s, + 10 s).
HELD_SECONDS = 15.0
TRIGGER = "airflow.providers.standard.triggers.temporal.TimeDeltaTrigger"
CONTROLS = ("airflow-defer", "airflow-defer-held", "airflow-run", "airflow-start-from-trigger")

PROVIDER_DAG = """
from airflow.sdk import DAG
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

with DAG(dag_id={dag_id!r}, schedule=None, catchup=False, default_args={{"retries": 2}}):
    FluxKontextEditOperator.partial(
        task_id="edit", input_image={image!r}, deferrable=True, min_defer_seconds={hold},
        wait_seconds={wait},
    ).expand(prompt=[f"bench edit {{i}}" for i in range({n})])
"""

CONTROL_DAG = '''
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, BaseOperator
{imports}

class ControlEdit(BaseOperator):
    """{doc}"""

    template_fields = ("prompt",)
{attributes}
    def __init__(self, *, prompt: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt

    def execute(self, context: Any) -> None:
        {execute}

    def done(self, context: Any, event: Any = None) -> None:
        return None


with DAG(dag_id={dag_id!r}, schedule=None, catchup=False, default_args={{"retries": 2}}):
    ControlEdit.partial(task_id="edit").expand(prompt=[f"bench edit {{i}}" for i in range({n})])
'''

_DEFER = "self.defer(trigger=TimeDeltaTrigger(timedelta(seconds={seconds})), method_name='done')"
_START_FROM_TRIGGER = """    start_from_trigger = True
    start_trigger_args = StartTriggerArgs(
        trigger_cls={trigger!r},
        trigger_kwargs={{"delta": timedelta(seconds={seconds})}},
        next_method="done",
        next_kwargs=None,
        timeout=None,
    )
"""
# hold -> (imports, class attributes, execute's body, docstring)
_CONTROL_PARTS = {
    "airflow-defer": (
        "from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger\n",
        "",
        _DEFER.format(seconds=MODEL_SECONDS),
        f"Defer for {MODEL_SECONDS} s, then end: two task starts.",
    ),
    "airflow-defer-held": (
        "from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger\n",
        "",
        _DEFER.format(seconds=HELD_SECONDS),
        f"Defer for {HELD_SECONDS} s, then end: two task starts, no deferral race.",
    ),
    "airflow-run": ("", "", "return None", "End at once: one task start."),
    "airflow-start-from-trigger": (
        "from airflow.sdk.exceptions import AirflowFailException\n"
        "from airflow.triggers.base import StartTriggerArgs\n",
        _START_FROM_TRIGGER.format(trigger=TRIGGER, seconds=MODEL_SECONDS),
        'raise AirflowFailException("started on a worker, not from the trigger")',
        f"Start in the triggerer ({MODEL_SECONDS} s), then end: one task start.",
    ),
}


def dag_text(n: int, hold: str) -> str:
    """Return the DAG file for ``n`` mapped edits and ``hold``.

    :raises ValueError: ``hold`` is neither ``default``, ``wait``, a number of seconds nor one of
        :data:`CONTROLS`.
    """
    dag_id = DAG_ID.format(n=n, hold=hold)
    if hold in _CONTROL_PARTS:
        imports, attributes, execute, doc = _CONTROL_PARTS[hold]
        return CONTROL_DAG.format(
            dag_id=dag_id, n=n, imports=imports, attributes=attributes, execute=execute, doc=doc
        )
    if hold not in ("default", "wait"):
        try:
            float(hold)
        except ValueError:
            allowed = ", ".join(("default", "wait", "a number of seconds", *CONTROLS))
            raise ValueError(f"airflow hold {hold!r} is not one of: {allowed}") from None
    return PROVIDER_DAG.format(
        dag_id=dag_id,
        image=TINY_PNG,
        n=n,
        hold="None" if hold in ("default", "wait") else hold,
        wait=60 if hold == "wait" else None,
    )
