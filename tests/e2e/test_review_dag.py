"""The review example driven by people's answers: a real Airflow, a reviewer answering in the API.

A real api-server, scheduler, dag-processor and triggerer (LocalExecutor) run ``kontext_review``
against the emulator: three edits, one Human-in-the-loop request each. A reviewer logs in and answers
through Airflow's public API, as the UI's "Required actions" page does: two approvals, one rejection.
``publish`` must copy exactly the two approved edits.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .cluster import Cluster, cluster_env
from .conftest import ROOT, TOKEN

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

DAG_ID = "kontext_review"
REVIEWER, PASSWORD = "reviewer", "reviewer-e2e-pw"
ANSWERS = {0: "Approve", 1: "Reject", 2: "Approve"}
#: How long the reviewer takes to answer once the requests are there (past the race window).
SETTLE_SECONDS = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Cluster, str]]:
    home = tmp_path / "home"
    dags = home / "dags"
    dags.mkdir(parents=True)
    shutil.copy(ROOT / "example_dags" / "kontext_review.py", dags)
    shutil.copytree(ROOT / "example_dags" / "images", dags / "images")
    (home / "passwords.json").write_text(json.dumps({REVIEWER: PASSWORD}))
    with FluxKontextEmulator(
        token=TOKEN, prediction_seconds=0.5, start_seconds=0.1, output_scale=0.25
    ) as emulator:
        connection = {"conn_type": "fluxkontext", "host": emulator.base_url, "password": TOKEN}
        env = cluster_env(
            home,
            dags,
            {"flux_kontext_default": connection},
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{REVIEWER}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        )
        c = Cluster(home, env)
        c.cli("db", "migrate")
        try:
            for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
                c.start(name)
            yield c, f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"
        finally:
            c.stop_all()


def test_only_the_edits_a_reviewer_approved_are_published(
    cluster: tuple[Cluster, str], tmp_path: Path
) -> None:
    c, base = cluster

    def token() -> str | None:
        try:
            answer = requests.post(
                f"{base}/auth/token", json={"username": REVIEWER, "password": PASSWORD}, timeout=60
            )
        except requests.RequestException:
            return None
        return str(answer.json()["access_token"]) if answer.status_code in (200, 201) else None

    c.wait_for("the API server", lambda: token() is not None, 180)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token()}"

    def dag_parsed() -> bool:
        try:
            return api.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=60).ok
        except requests.RequestException:
            return False

    c.wait_for("the DAG to be parsed", dag_parsed, 180)
    publish_dir = tmp_path / "published"
    started = api.post(
        f"{base}/api/v2/dags/{DAG_ID}/dagRuns",
        json={
            "logical_date": None,
            "conf": {"output_dir": str(tmp_path / "edits"), "publish_dir": str(publish_dir)},
        },
        timeout=60,
    )
    assert started.status_code == 200, started.text
    run_id = started.json()["dag_run_id"]
    ti_path = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"

    def run_state() -> str:
        try:
            return str(api.get(f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=60).json()["state"])
        except requests.RequestException:
            return "unknown"

    def waiting_for_review() -> bool:
        assert run_state() != "failed", "the run failed before its reviews"
        try:
            return all(api.get(f"{ti_path}/review/{i}/hitlDetails", timeout=60).ok for i in ANSWERS)
        except requests.RequestException:  # a busy machine's API server: ask again
            return False

    c.wait_for("three review requests", waiting_for_review, 600)

    # A person answers after seconds, not milliseconds. An answer within Airflow's deferral race window
    # (the scheduler may not yet have seen the deferring try exit: up to [workers]
    # min_heartbeat_interval + a few seconds; docs/deferral.md) can get the resumed try failed, as it
    # did here once on a busy machine. The provider's own trigger holds its event past that window; the
    # standard provider's HITL trigger does not, so the reviewer waits it out.
    time.sleep(SETTLE_SECONDS)
    request = api.get(f"{ti_path}/review/0/hitlDetails", timeout=60).json()
    assert request["options"] == ["Approve", "Reject"]
    assert f"/kontext/edit?dag_id={DAG_ID}" in request["body"]  # the link to the edit's before/after
    assert "/kontext/gallery?" in request["body"]
    for index, choice in ANSWERS.items():
        answer = api.patch(
            f"{ti_path}/review/{index}/hitlDetails", json={"chosen_options": [choice]}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["responded_by"]["name"] == REVIEWER

    c.wait_for("the run to end", lambda: run_state() in ("success", "failed"), 300)
    assert run_state() == "success"

    def xcom(task_id: str, key: str, map_index: int = -1) -> Any:
        answer = api.get(
            f"{ti_path}/{task_id}/xcomEntries/{key}", params={"map_index": map_index}, timeout=60
        )
        assert answer.ok, answer.text
        value = answer.json()["value"]
        return json.loads(value) if isinstance(value, str) else value

    published = xcom("publish", "return_value")
    approved = sorted(
        Path(str(xcom("edit", "prediction", i)["outputs"][0]).removeprefix("file://")).name
        for i, choice in ANSWERS.items()
        if choice == "Approve"
    )
    assert len(approved) == 2
    assert sorted(Path(p).name for p in published) == approved
    assert sorted(p.name for p in publish_dir.rglob("*.png")) == approved
