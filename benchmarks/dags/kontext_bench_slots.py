"""Worker-slot benchmark DAGs: the same batch of edits three ways. Copied into a temporary DAG folder
by :mod:`benchmarks.slots` and run with ``airflow dags test``.

Each operator's own time in the worker (``execute``, and ``execute_complete`` after a deferral) is
appended to ``$BENCH_SLOTS_OUT`` as a JSON line.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

EDITS = int(os.environ.get("BENCH_EDITS", "3"))
PROMPTS = [f"make it a watercolour, take {i}" for i in range(EDITS)]
IMAGE = os.environ.get("BENCH_IMAGE", "")
MODEL = "black-forest-labs/flux-kontext-dev"
UNUSED_TOKEN = "r8_bench_unused"  # noqa: S105 (the emulator runs without auth; the client wants one)


def _record(dag_id: str, task: str, phase: str, seconds: float) -> None:
    with open(os.environ["BENCH_SLOTS_OUT"], "a") as out:
        out.write(json.dumps({"dag": dag_id, "task": task, "phase": phase, "seconds": seconds}) + "\n")


class TimedEdit(FluxKontextEditOperator):
    """``FluxKontextEditOperator`` that reports how long each of its worker phases took."""

    def execute(self, context: Any) -> list[str]:
        started = time.perf_counter()
        try:
            return super().execute(context)
        finally:  # also when it defers (TaskDeferred)
            _record(self.dag_id, self.task_id, "execute", time.perf_counter() - started)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> list[str]:
        started = time.perf_counter()
        try:
            return super().execute_complete(context, event)
        finally:
            _record(self.dag_id, self.task_id, "execute_complete", time.perf_counter() - started)


def edit_with_replicate(prompt: str) -> list[str]:
    """What a user writes without the provider: ``replicate.run`` in a PythonOperator."""
    from replicate.client import Client

    started = time.perf_counter()
    try:
        client = Client(api_token=UNUSED_TOKEN, base_url=os.environ["BENCH_BASE_URL"])
        output = client.run(MODEL, input={"prompt": prompt, "input_image": IMAGE, "aspect_ratio": "1:1"})
        items = output if isinstance(output, list) else [output]
        return [str(getattr(item, "url", item)) for item in items]
    finally:
        _record("kontext_bench_replicate", "edit", "execute", time.perf_counter() - started)


for dag_id, deferrable in (("kontext_bench_deferrable", True), ("kontext_bench_in_worker", False)):
    with DAG(dag_id=dag_id, schedule=None, catchup=False):
        TimedEdit.partial(
            task_id="edit", input_image=IMAGE, aspect_ratio="1:1", deferrable=deferrable
        ).expand(prompt=PROMPTS)

with DAG(dag_id="kontext_bench_replicate", schedule=None, catchup=False):
    PythonOperator.partial(task_id="edit", python_callable=edit_with_replicate).expand(
        op_args=[[prompt] for prompt in PROMPTS]
    )
