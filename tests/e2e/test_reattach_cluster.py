"""Test retry versus clear in a real Airflow: a retry pays nothing, a clear edits again.

Retry versus clear in a real Airflow (scheduler, dag-processor, api-server, LocalExecutor): a try
whose worker dies after the provider finished the edit, before Airflow recorded its success, is
retried into the same prediction and pays nothing; a clear of the succeeded task edits afresh.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env

pytestmark = pytest.mark.e2e

TOKEN = "r8_ReattachE2E_Canary_51c0e2d4"
DAG_ID = "kontext_reattach"
DAG = """
import os
from datetime import timedelta
from airflow.sdk import DAG
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator


class DiesAfterFinishing(FluxKontextEditOperator):
    \"\"\"Try 1 finishes the edit (outputs saved, entry marked finished), then its worker dies before
    Airflow records the success: what the scheduler race or a kill of a resuming worker does.\"\"\"

    def execute(self, context):
        result = super().execute(context)
        if context["ti"].try_number == 1:
            print("simulated worker death after the edit finished", flush=True)
            os._exit(1)
        return result


with DAG(dag_id="kontext_reattach", schedule=None, catchup=False,
         default_args={{"retries": 1, "retry_delay": timedelta(0)}}):
    DiesAfterFinishing(task_id="edit", prompt="reattach e2e", input_image={image!r},
                       output_format="png", deferrable=False, poll_interval=0.3,
                       output_path={output!r})
"""


def _image_uri() -> str:
    import base64

    png = (Path(__file__).parents[2] / "example_dags" / "images" / "mug.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _task(cluster: Cluster) -> tuple[str, int] | None:
    rows = cluster.query(
        "select state, try_number from task_instance where dag_id = ? and task_id = 'edit'", DAG_ID
    )
    return (rows[0][0], int(rows[0][1])) if rows else None


@pytest.mark.timeout(900)
def test_a_killed_finished_try_is_retried_for_free_and_a_clear_edits_afresh(tmp_path: Path) -> None:
    home = tmp_path / "home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    output = tmp_path / "outputs"
    (dags / "kontext_reattach.py").write_text(DAG.format(image=_image_uri(), output=str(output)))
    with FluxKontextEmulator(token=TOKEN, prediction_seconds=1.0, start_seconds=0.1, output_scale=0.1) as api:
        connections = {
            "flux_kontext_default": {"conn_type": "fluxkontext", "host": api.base_url, "password": TOKEN}
        }
        cluster = Cluster(home, cluster_env(home, dags, connections))
        cluster.cli("db", "migrate")
        try:
            for name in ("api-server", "scheduler", "dag-processor"):
                cluster.start(name)
            cluster.wait_for(
                "the DAG to be parsed",
                lambda: bool(cluster.query("select 1 from dag where dag_id = ?", DAG_ID)),
                120,
            )
            # A logical date, so that ``tasks clear`` (which selects by date) finds the run.
            cluster.cli("dags", "trigger", DAG_ID, "--logical-date", "2026-01-01T00:00:00+00:00")
            cluster.wait_for("the retry to succeed", lambda: _task(cluster) == ("success", 2), 240)
            assert api.created_count == 1  # the retry completed from the finished prediction
            first = next(iter(api.predictions))
            assert sorted(p.name for p in output.iterdir() if p.is_file()) == [f"{first}.png"]

            cluster.cli("tasks", "clear", DAG_ID, "-t", "edit", "-y")  # "^edit$" matches nothing on 3.3
            cluster.wait_for("the cleared task to succeed", lambda: _task(cluster) == ("success", 3), 240)

        finally:
            cluster.stop_all()
        assert api.created_count == 2  # the clear asked for a fresh edit, and got one
    second = next(pid for pid in api.predictions if pid != first)
    assert sorted(p.name for p in output.iterdir() if p.is_file()) == sorted(
        [f"{first}.png", f"{second}.png"]
    )
    logs = "\n".join(p.read_text(errors="replace") for p in home.glob("logs/**/*.log"))
    assert "simulated worker death after the edit finished" in logs
    assert f"Try 1 finished prediction {first} but Airflow did not record its success" in logs
    assert f"Prediction {first} finished in try 2 before this task instance was cleared" in logs
