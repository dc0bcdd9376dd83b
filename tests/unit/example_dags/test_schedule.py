"""The scheduled example pipeline never bills twice by surprise: unpausing it starts no run.

"Trigger" in Airflow's UI also unpauses a paused DAG; with ``@daily``, a start date and no catchup,
that one click started the manual run and the latest past day's run (every edit billed twice).
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.timetables.base import TimeRestriction

PIPELINE = Path(__file__).resolve().parents[3] / "example_dags" / "kontext_asset_pipeline.py"


def _dag() -> Any:
    spec = importlib.util.spec_from_file_location("kontext_asset_pipeline_for_test", PIPELINE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


@pytest.mark.parametrize("clock", ["03:00:01", "03:14:00", "05:00:00", "12:00:00", "02:59:00", "23:59:59"])
def test_unpausing_the_pipeline_schedules_its_first_run_in_the_future(
    monkeypatch: pytest.MonkeyPatch, clock: str
) -> None:
    import pendulum
    from airflow.timetables import trigger

    now = pendulum.parse(f"2026-12-06T{clock}+00:00")
    monkeypatch.setattr(trigger, "utcnow", lambda: now)
    dag = _dag()
    restriction = TimeRestriction(earliest=dag.start_date, latest=None, catchup=dag.catchup)
    first = dag.timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    assert first is not None
    assert first.run_after > now  # no run for a day that has already passed, whatever the hour
    assert first.run_after - now <= timedelta(days=1)  # but it is still a nightly pipeline
    assert dag.catchup is False


def test_the_review_example_parses_and_publishes_only_approved_edits() -> None:
    spec = importlib.util.spec_from_file_location(
        "kontext_review_for_test", PIPELINE.parent / "kontext_review.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag
    assert dag.schedule is None  # waits for people: never started by a schedule
    # The review texts read the edits' summaries: written only once every edit has ended.
    assert [t.task_id for t in dag.get_task("review_requests").upstream_list] == ["edit"]
    assert [t.task_id for t in dag.get_task("review").upstream_list] == ["review_requests"]
    summaries = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    decisions = [
        {"chosen_options": ["Approve"]},
        {"chosen_options": ["Reject"]},
        {"chosen_options": ["Approve"]},
    ]
    assert [s["id"] for s in module.approved(summaries, decisions)] == ["a", "c"]
    with pytest.raises(ValueError, match="3 edits but 2 reviews"):
        module.approved(summaries, decisions[:2])
    assert module.plugin_link("gallery", dag_id="d", run_id="r+1").endswith(
        "/kontext/gallery?dag_id=d&run_id=r%2B1"
    )
