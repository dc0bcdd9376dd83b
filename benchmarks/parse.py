"""Scenario 3: DAG-parse overhead of the provider. Two DAG files that differ only in their operator
(``FluxKontextEditOperator``, or a plain ``airflow.sdk.BaseOperator`` subclass taking the same
arguments) are imported alternately, each in a fresh interpreter that has already imported
``airflow.sdk`` (which every DAG file pays, ~1 s): the time measured is the DAG file's own import,
as the DAG processor's parse of that file pays it on top.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, child_env

HEADER = '''"""Parse-overhead benchmark DAG."""

from airflow.sdk import DAG
'''

KONTEXT = (
    HEADER
    + """from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator as Edit

with DAG(dag_id="parse_bench", schedule=None, catchup=False):
    Edit(task_id="edit", prompt="make it a watercolour", input_image="https://example.com/in.png")
"""
)

PLAIN = (
    HEADER
    + """from airflow.sdk import BaseOperator


class Edit(BaseOperator):
    def __init__(self, *, prompt: str, input_image: str, **kwargs):
        super().__init__(**kwargs)
        self.prompt = prompt
        self.input_image = input_image

    def execute(self, context):
        return None


with DAG(dag_id="parse_bench", schedule=None, catchup=False):
    Edit(task_id="edit", prompt="make it a watercolour", input_image="https://example.com/in.png")
"""
)

MEASURE = """
import importlib.util, sys, time
import airflow.sdk  # common to every DAG file: not measured
import airflow.sdk.definitions.dag  # noqa
path = sys.argv[1]
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("parse_bench_dag", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(f"{(time.perf_counter() - started) * 1000:.3f}")
"""


def _once(path: Path, env: dict[str, str]) -> float:
    out = subprocess.run(
        [PYTHON, "-c", MEASURE, str(path)], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return float(out.stdout.strip().splitlines()[-1])


def run(rounds: int = 15) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kontext-bench-parse-") as folder:
        kontext, plain = Path(folder) / "kontext_dag.py", Path(folder) / "plain_dag.py"
        kontext.write_text(KONTEXT)
        plain.write_text(PLAIN)
        env = child_env(AIRFLOW_HOME=folder, PYTHONDONTWRITEBYTECODE="")
        _once(kontext, env)  # warm the OS file cache and write .pyc files, as a DAG processor has them
        _once(plain, env)
        kontext_ms: list[float] = []
        plain_ms: list[float] = []
        for i in range(rounds):
            # alternate the order too, so drift in machine load does not favour either
            order = [(kontext, kontext_ms), (plain, plain_ms)]
            for path, sink in order if i % 2 == 0 else reversed(order):
                sink.append(_once(path, env))
    pairs = [k - p for k, p in zip(kontext_ms, plain_ms, strict=True)]
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) >= 2 else [pairs[0]] * 3
    return {
        "rounds": rounds,
        "kontext_ms": kontext_ms,
        "plain_ms": plain_ms,
        "kontext_median_ms": statistics.median(kontext_ms),
        "plain_median_ms": statistics.median(plain_ms),
        "added_median_ms": statistics.median(pairs),
        "added_q1_ms": quartiles[0],
        "added_q3_ms": quartiles[2],
    }
