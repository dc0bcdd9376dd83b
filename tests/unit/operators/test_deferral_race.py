"""Test the deferral race: a deferred edit or sensor resumes no sooner than ``min_defer_seconds``.

The deferral race: a deferred edit or sensor resumes no sooner than ``min_defer_seconds`` after it
deferred, so that Airflow's scheduler has processed the deferring try's exit before the resumed try
runs (else Airflow 3.1-3.3 fail it: "finished with state success, but the task instance's state
attribute is queued/running"). The trigger holds a terminal event found sooner; the operator and
sensor tell it when they deferred and how long to hold. The real race is reproduced in a cluster by
``tests/e2e/test_deferral_race.py``. The hook is mocked and the trigger's clock and sleeps faked.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from airflow.sdk.execution_time import task_runner
from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms
from factories import api_prediction

from airflow_provider_kontext.compat import TaskDeferred
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
from airflow_provider_kontext.sensors.kontext import FluxKontextPredictionSensor
from airflow_provider_kontext.triggers import kontext as trigger_module
from airflow_provider_kontext.triggers import source as source_module
from airflow_provider_kontext.triggers.kontext import (
    SETTLE_SLACK_SECONDS,
    FluxKontextPredictionTrigger,
    default_min_defer_seconds,
)

PID = "race0prediction0id0001"
DEFERRED_AT = 1_750_000_000.0


@pytest.fixture
def hook():
    """Return the hook the trigger builds (class patched where the trigger imports it from)."""
    instance = mock.MagicMock(name="FluxKontextHook()")
    instance.aget_prediction = mock.AsyncMock()
    instance.aclose = mock.AsyncMock()
    instance.aget_settings = mock.AsyncMock(return_value=ClientSettings("c", "https://api.example"))
    instance.redact = lambda text: text
    with mock.patch("airflow_provider_kontext.hooks.kontext.FluxKontextHook", return_value=instance):
        yield instance


@pytest.fixture
def clock():
    """Fake ``time.time`` and ``asyncio.sleep`` of the trigger and its source: sleeping advances the clock."""
    state = SimpleNamespace(now=DEFERRED_AT, sleeps=[])

    async def fake_sleep(seconds: float) -> None:
        state.sleeps.append(seconds)
        state.now += seconds

    fake_asyncio = SimpleNamespace(
        sleep=fake_sleep, wait_for=asyncio.wait_for, TimeoutError=asyncio.TimeoutError
    )
    with (
        mock.patch.object(trigger_module, "asyncio", fake_asyncio),
        mock.patch.object(source_module, "asyncio", fake_asyncio),
        mock.patch.object(trigger_module, "time", SimpleNamespace(time=lambda: state.now)),
    ):
        yield state


def make_trigger(**kwargs: Any) -> FluxKontextPredictionTrigger:
    trigger = FluxKontextPredictionTrigger(
        prediction_id=PID, poll_interval=1.0, poll_policy="fixed", **kwargs
    )
    trigger._log = mock.Mock()  # LoggingMixin caches its logger here
    return trigger


async def events(trigger: FluxKontextPredictionTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


def done(status: str = "succeeded") -> Any:
    fields = {"output": "https://replicate.delivery/x/out.webp"} if status == "succeeded" else {}
    return api_prediction(PID, status, created_at="2025-05-01T10:00:00+00:00", **fields)


# --- the trigger holds an early event ---------------------------------------------------------------


async def test_an_event_sooner_than_the_window_is_held_until_its_end(hook, clock):
    hook.aget_prediction.side_effect = [api_prediction(PID, "processing"), done()]
    trigger = make_trigger(deferred_at=DEFERRED_AT, min_defer_seconds=10.0)
    assert [e["status"] for e in await events(trigger)] == ["succeeded"]
    # One poll interval (1 s), then the hold to deferred_at + 10 s, then the event.
    assert clock.sleeps == [1.0, 9.0]
    assert clock.now == DEFERRED_AT + 10.0
    line = trigger._log.info.call_args_list[-1]
    assert "Holding the event 9.0 s" in line.args[0] % line.args[1:]


@pytest.mark.parametrize("status", ["failed", "canceled"])
async def test_every_terminal_event_is_held(hook, clock, status):
    hook.aget_prediction.side_effect = [done(status)]
    await events(make_trigger(deferred_at=DEFERRED_AT, min_defer_seconds=4.0))
    assert clock.sleeps == [4.0]


async def test_an_error_event_is_held_too(hook, clock):
    hook.aget_prediction.side_effect = ValueError("bad extra")
    payloads = await events(make_trigger(deferred_at=DEFERRED_AT, min_defer_seconds=4.0))
    assert payloads[0]["status"] == "error"
    assert clock.sleeps == [4.0]


async def test_an_event_after_the_window_is_not_held(hook, clock):
    clock.now = DEFERRED_AT + 30  # e.g. a trigger restarted long after the deferral
    hook.aget_prediction.side_effect = [done()]
    await events(make_trigger(deferred_at=DEFERRED_AT, min_defer_seconds=10.0))
    assert clock.sleeps == []


@pytest.mark.parametrize("kwargs", [{}, {"deferred_at": DEFERRED_AT, "min_defer_seconds": 0.0}])
async def test_no_hold_without_a_deferral_time_or_with_zero(hook, clock, kwargs):
    hook.aget_prediction.side_effect = [done()]
    await events(make_trigger(**kwargs))
    assert clock.sleeps == []


async def test_without_min_defer_seconds_the_triggerers_default_applies(hook, clock, monkeypatch):
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "2")
    hook.aget_prediction.side_effect = [done()]
    await events(make_trigger(deferred_at=DEFERRED_AT))
    assert clock.sleeps == [2 + SETTLE_SLACK_SECONDS]


def test_the_hold_round_trips_as_json_primitives():
    trigger = make_trigger(deferred_at=DEFERRED_AT, min_defer_seconds=7)
    classpath, kwargs = trigger.serialize()
    assert kwargs["deferred_at"] == DEFERRED_AT
    assert type(kwargs["min_defer_seconds"]) is float
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert FluxKontextPredictionTrigger(**kwargs).serialize() == (classpath, kwargs)
    # kwargs of an earlier version (no deferral time) build a trigger that does not hold
    _, old = make_trigger().serialize()
    assert "deferred_at" not in old
    assert "min_defer_seconds" not in old


# --- the default --------------------------------------------------------------------------------------


def test_default_is_the_workers_heartbeat_interval_plus_slack(monkeypatch):
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "3")
    assert default_min_defer_seconds() == 3 + SETTLE_SLACK_SECONDS
    monkeypatch.delenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL")
    assert default_min_defer_seconds() == 5 + SETTLE_SLACK_SECONDS  # Airflow's default interval


def test_default_is_zero_in_dags_test(monkeypatch):
    """``dag.test()`` runs the trigger in line after the deferring run ended: nothing to wait for."""
    comms = mock.Mock(spec=InProcessSupervisorComms)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", comms, raising=False)
    assert default_min_defer_seconds() == 0.0


# --- the operator and the sensor say when they deferred ---------------------------------------------


@pytest.fixture
def op_hook():
    fake = mock.create_autospec(FluxKontextHook, instance=True)
    fake.create_prediction.return_value = api_prediction(PID, "starting")
    fake.get_prediction.return_value = api_prediction(PID, "processing")
    with (
        mock.patch.object(FluxKontextEditOperator, "hook", fake),
        mock.patch.object(FluxKontextPredictionSensor, "hook", fake),
    ):
        yield fake


def deferred_kwargs(task: Any, context: dict[str, Any]) -> dict[str, Any]:
    task._cached_logger = mock.Mock()
    with pytest.raises(TaskDeferred) as info:
        task.execute(context)
    return info.value.trigger.serialize()[1]


def test_the_operator_passes_its_deferral_time_and_default_hold(op_hook, monkeypatch):
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "4")
    op = FluxKontextEditOperator(task_id="edit", prompt="p", input_image="https://example.com/a.png")
    before = trigger_module.time.time()
    kwargs = deferred_kwargs(op, {"ti": mock.MagicMock()})
    assert before <= kwargs["deferred_at"] <= trigger_module.time.time()
    assert kwargs["min_defer_seconds"] == 4 + SETTLE_SLACK_SECONDS


def test_the_operators_min_defer_seconds_wins(op_hook):
    op = FluxKontextEditOperator(
        task_id="edit", prompt="p", input_image="https://example.com/a.png", min_defer_seconds=0
    )
    assert deferred_kwargs(op, {"ti": mock.MagicMock()})["min_defer_seconds"] == 0.0


@pytest.mark.parametrize("value", [-1, 601, "soon", float("nan")])
def test_a_bad_min_defer_seconds_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="min_defer_seconds"):
        FluxKontextEditOperator(task_id="edit", prompt="p", min_defer_seconds=value)


def test_the_sensor_passes_its_deferral_time_and_default_hold(op_hook, monkeypatch):
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "1")
    sensor = FluxKontextPredictionSensor(task_id="wait", prediction_id=PID, timeout=60)
    kwargs = deferred_kwargs(sensor, {"ti": mock.MagicMock()})
    assert kwargs["deferred_at"] > 0
    assert kwargs["min_defer_seconds"] == 1 + SETTLE_SLACK_SECONDS


async def test_a_worker_clock_ahead_of_the_triggerers_holds_no_longer_than_the_hold(hook, clock):
    hook.aget_prediction.side_effect = [done()]
    # The worker's clock said the deferral came 60 s after the triggerer's "now".
    await events(make_trigger(deferred_at=clock.now + 60, min_defer_seconds=10.0))
    assert clock.sleeps == [10.0]
