"""Test the reattach entry's states, retry versus clear, and adopting an unrecorded prediction.

The reattach entry's states (create under way, created, finished by try N, cleared), how a retry
is told from a clear, and the operator adopting a prediction an earlier try did not record.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest

from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.edits.reattach import ReattachLedger, Series
from airflow_provider_kontext.edits.request import drawn_seed, seed_key
from airflow_provider_kontext.exceptions import FluxKontextAPIError, FluxKontextServerError
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import PredictionPage
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

from ..operators.kontext.helpers import (
    IMAGE_URL,
    NEW_PID,
    OLD_PID,
    PNG,
    PROMPT,
    STATE_KEY,
    FakeStore,
    make_context,
    make_op,
    make_prediction,
    pushed,
    run_deferring,
    succeeded,
)

RUN_START = datetime(2026, 12, 6, 1, 0, tzinfo=timezone.utc)
#: The seed every try of these tests' task instance (retries=2, never cleared) sends.
SEED = drawn_seed(
    "black-forest-labs/flux-kontext-dev",
    {"prompt": PROMPT, "input_image": IMAGE_URL},
    None,
    seed_key(make_context(max_tries=2)),
)


@pytest.fixture
def hook() -> Iterator[Any]:
    """Replace the operator's ``hook`` with a spec'd mock (as the edit operator tests do)."""
    fake = mock.create_autospec(FluxKontextHook, instance=True)
    fake.create_prediction.return_value = make_prediction("starting")
    fake.redact.side_effect = lambda text: text
    with mock.patch.object(FluxKontextEditOperator, "hook", fake):
        yield fake


def ledger(
    store: FakeStore, try_number: int = 1, max_tries: int = 2, clear_number: int = 0
) -> ReattachLedger:
    return ReattachLedger(store, Series(try_number, max_tries, clear_number))


# --- the ledger's states ---------------------------------------------------------------------------


def test_create_under_way_then_created_then_finished():
    store = FakeStore()
    first = ledger(store)
    first.begin_create("fp", 1000.0)
    assert first.creating() == ("fp", 1000.0)
    assert first.started() is None
    first.record("p1", "fp", 2000.0)
    assert first.creating() is None
    assert first.started() == ("p1", "fp", 2000.0, None)
    first.finish("p1")
    assert store.data[STATE_KEY]["finished"] == {"try_number": 1, "max_tries": 2, "clear_number": 0}
    assert first.started() == ("p1", "fp", 2000.0, {"try_number": 1, "max_tries": 2, "clear_number": 0})


def test_finish_leaves_another_predictions_entry_alone_and_drop_deletes():
    store = FakeStore()
    first = ledger(store)
    first.record("p1", "fp", 2000.0)
    first.finish("p2")
    assert "finished" not in store.data[STATE_KEY]
    first.drop()
    assert STATE_KEY not in store.data


@pytest.mark.parametrize(
    ("later", "continues"),
    [
        (Series(2, 2, 0), True),  # Airflow failed try 1 after it finished: a retry
        (Series(1, 2, 0), True),  # the same try, resumed
        (Series(2, 3, 1), False),  # cleared: max_tries = try number + retries, clear_number raised
        (Series(2, 2, 1), False),  # cleared with retries lowered by one: clear_number still differs
        (Series(3, 4, 0), False),  # max_tries changed (cleared while running)
    ],
)
def test_a_finished_entry_belongs_to_its_series_only(later, continues):
    assert later.continues({"try_number": 1, "max_tries": 2, "clear_number": 0}) is continues


@pytest.mark.parametrize(
    ("series", "retries", "first"),
    [
        (Series(1, 2, 0), 2, True),
        (Series(2, 2, 0), 2, False),
        (Series(2, 3, 1), 2, True),
        (Series(None, 2, 0), 2, True),
    ],
)
def test_first_try_of_a_series_is_reckoned_as_airflow_does(series, retries, first):
    assert series.first_try(retries) is first


def test_series_of_a_context():
    context = make_context(try_number=3, max_tries=4)
    context["dag_run"].clear_number = 2
    assert Series.of(context) == (3, 4, 2)
    assert Series.of({"ti": mock.MagicMock(try_number="3")}) == (None, None, None)


# --- finished: a retry completes from it, a clear edits afresh -------------------------------------


def finished_store(hook: Any, **op_kwargs: Any) -> tuple[FakeStore, list[str]]:
    """Try 1 (retries=2) creates ``OLD_PID``, which succeeds; return the store it leaves and its result."""
    hook.create_prediction.return_value = succeeded(OLD_PID)
    store = FakeStore()
    result = make_op(retries=2, **op_kwargs).execute(make_context(store, try_number=1, max_tries=2))
    assert store.data[STATE_KEY]["finished"]["try_number"] == 1
    hook.reset_mock()
    hook.create_prediction.return_value = make_prediction("starting", NEW_PID)
    return store, result


def test_a_try_airflow_failed_after_it_finished_is_retried_into_the_same_prediction(hook):
    store, first = finished_store(hook)
    hook.get_prediction.return_value = succeeded(OLD_PID)
    context = make_context(store, try_number=2, max_tries=2)
    assert make_op(retries=2).execute(context) == first
    hook.create_prediction.assert_not_called()
    assert pushed(context)["prediction"]["id"] == OLD_PID


def test_a_retry_saves_the_same_outputs_under_output_path(hook, tmp_path):
    output = "data:image/png;base64," + base64.b64encode(PNG).decode()
    hook.create_prediction.return_value = succeeded(OLD_PID, output=output)
    store = FakeStore()
    op_kwargs = {"retries": 2, "output_path": str(tmp_path)}
    first = make_op(**op_kwargs).execute(make_context(store, try_number=1, max_tries=2))
    hook.get_prediction.return_value = succeeded(OLD_PID, output=output)
    again = make_op(**op_kwargs).execute(make_context(store, try_number=2, max_tries=2))
    assert again == first
    assert first[0].endswith(f"/cat-{OLD_PID}.png")
    assert hook.create_prediction.call_count == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"cat-{OLD_PID}.png"]
    assert (tmp_path / f"cat-{OLD_PID}.png").read_bytes() == PNG


def test_a_cleared_task_edits_afresh(hook):
    store, _ = finished_store(hook)
    context = make_context(store, try_number=2, max_tries=3)  # cleared: max_tries = 1 + retries
    context["dag_run"].clear_number = 1
    op = make_op(retries=2)
    run_deferring(op, context)
    hook.create_prediction.assert_called_once()
    hook.get_prediction.assert_not_called()
    assert store.data[STATE_KEY]["id"] == NEW_PID
    assert any(
        "before this task instance was cleared" in c.args[0] for c in op._cached_logger.info.call_args_list
    )


def test_the_resumed_try_marks_the_entry_finished(hook):
    store = FakeStore({STATE_KEY: {"id": OLD_PID, "fingerprint": "f", "deadline": 1.0}})
    make_op().execute_complete(
        make_context(store, try_number=4, max_tries=5), prediction_event(succeeded(OLD_PID))
    )
    assert store.data[STATE_KEY]["finished"] == {"try_number": 4, "max_tries": 5, "clear_number": 0}


# --- create under way: the retry searches and adopts -----------------------------------------------


def listed(pid: str, **input: Any) -> dict[str, Any]:
    return {
        "id": pid,
        "model": "black-forest-labs/flux-kontext-dev",
        "version": "hidden",
        "status": "processing",
        "input": {"prompt": PROMPT, "input_image": IMAGE_URL, "seed": SEED, **input},
        "created_at": RUN_START.isoformat(),
        "urls": {"get": f"https://api.replicate.com/v1/predictions/{pid}"},
    }


def died_after_create(hook: Any) -> FakeStore:
    """Try 1 sends its create and dies before the id is recorded (the create itself went through)."""
    store = FakeStore()
    hook.create_prediction.side_effect = SystemExit(1)
    with pytest.raises(SystemExit):
        make_op(retries=2).execute(make_context(store, max_tries=2))
    assert set(store.data[STATE_KEY]) == {"creating"}
    hook.reset_mock(side_effect=True)
    hook.create_prediction.return_value = make_prediction("starting", NEW_PID)
    return store


def test_a_retry_adopts_the_one_prediction_its_earlier_try_created(hook):
    store = died_after_create(hook)
    hook.list_predictions.return_value = PredictionPage(results=[listed("other", seed=3), listed(OLD_PID)])
    deferred = run_deferring(make_op(retries=2), make_context(store, try_number=2, max_tries=2))
    assert deferred.trigger.prediction_id == OLD_PID
    hook.create_prediction.assert_not_called()
    assert store.data[STATE_KEY]["id"] == OLD_PID  # a later retry reattaches without searching
    since = datetime.fromisoformat(hook.list_predictions.call_args.kwargs["created_after"])
    assert since <= datetime.now(timezone.utc)


@pytest.mark.parametrize("results", [[], [listed("a"), listed("b")]], ids=["none", "ambiguous"])
def test_no_or_several_matches_create_and_say_why(hook, results):
    store = died_after_create(hook)
    hook.list_predictions.return_value = PredictionPage(results=results)
    op = make_op(retries=2)
    run_deferring(op, make_context(store, try_number=2, max_tries=2))
    hook.create_prediction.assert_called_once()
    said = " ".join(c.args[0] % c.args[1:] for c in op._cached_logger.info.call_args_list)
    assert "No prediction of an earlier try adopted" in said


def test_a_server_without_a_list_creates_and_a_failing_list_fails_the_try(hook):
    store = died_after_create(hook)
    hook.list_predictions.side_effect = FluxKontextAPIError(status=404)
    run_deferring(make_op(retries=2), make_context(store, try_number=2, max_tries=2))
    hook.create_prediction.assert_called_once()
    store = died_after_create(hook)
    hook.list_predictions.side_effect = FluxKontextServerError(status=503)
    with pytest.raises(FluxKontextServerError):
        make_op(retries=2).execute(make_context(store, try_number=2, max_tries=2))
    hook.create_prediction.assert_not_called()
    assert set(store.data[STATE_KEY]) == {"creating"}  # the next retry searches again


def test_a_refused_create_leaves_nothing_to_search_for(hook):
    store = FakeStore()
    hook.create_prediction.side_effect = FluxKontextAPIError(status=422)
    with pytest.raises(Exception, match="422"):
        make_op().execute(make_context(store))
    assert store.data == {}


def test_no_search_without_a_create_under_way(hook):
    run_deferring(make_op(retries=2), make_context(FakeStore(), try_number=2, max_tries=2))
    hook.list_predictions.assert_not_called()


# --- no store (Airflow 3.1/3.2): retries of a never-cleared run search from the run's start ----------


def no_store_context(try_number: int, clear_number: int = 0) -> dict[str, Any]:
    context = make_context(None, try_number=try_number, max_tries=2)
    context["dag_run"].start_date = RUN_START
    context["dag_run"].clear_number = clear_number
    return context


def test_without_a_store_a_retry_searches_from_the_runs_start(hook):
    created = datetime.now(timezone.utc) - timedelta(seconds=10)
    hook.list_predictions.return_value = PredictionPage(
        results=[{**listed(OLD_PID), "created_at": created.isoformat()}]
    )
    deferred = run_deferring(make_op(retries=2, timeout=600), no_store_context(try_number=2))
    assert deferred.trigger.prediction_id == OLD_PID
    # The deadline runs from the prediction's create, not from the run's start (long past).
    assert abs(deferred.trigger.end_time - (created.timestamp() + 600)) < 1
    hook.create_prediction.assert_not_called()
    since = datetime.fromisoformat(hook.list_predictions.call_args.kwargs["created_after"])
    assert since < RUN_START


@pytest.mark.parametrize(("try_number", "clear_number"), [(1, 0), (2, 1)], ids=["first try", "cleared run"])
def test_without_a_store_a_first_try_or_a_cleared_run_does_not_search(hook, try_number, clear_number):
    run_deferring(make_op(retries=2), no_store_context(try_number, clear_number))
    hook.list_predictions.assert_not_called()
    hook.create_prediction.assert_called_once()
