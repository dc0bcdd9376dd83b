"""Test ``FluxKontextPredictionTrigger``: serialization, events, progress, errors, deadline, cleanup.

``FluxKontextPredictionTrigger``: serialization, one event per terminal status, progress, errors,
deadline, restart from kwargs, cleanup and on_kill. The hook is mocked, except where a poll's retries
and deadline are tested: those run the real hook against a scripted aiohttp server on 127.0.0.1.
Nothing waits or leaves the machine.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from airflow.triggers.base import TriggerEvent
from factories import api_prediction

from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.exceptions import (
    FluxKontextAuthError,
    FluxKontextNotFoundError,
    FluxKontextServerError,
)
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.retry import RetryLimits
from airflow_provider_kontext.hooks.transports import SharedAsyncClient
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.triggers import kontext as trigger_module
from airflow_provider_kontext.triggers import source as source_module
from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

CLASSPATH = "airflow_provider_kontext.triggers.kontext.FluxKontextPredictionTrigger"
PID = "q8vz1d2ktxrmc0cn3a5b"
CONN_ID = "my_kontext"
TOKEN = "r8_TriggerTestToken_5c1e9a7d"  # recognisable, so a leak is easy to find


SECRET_ECHO = "r8_ECHOED_BY_A_PROXY"


def make_prediction(status: str, **fields: Any) -> Prediction:
    return api_prediction(PID, status, **{"created_at": "2025-05-01T10:00:00+00:00", **fields})


def make_trigger(**overrides: Any) -> FluxKontextPredictionTrigger:
    kwargs: dict[str, Any] = {
        "prediction_id": PID,
        "flux_kontext_conn_id": CONN_ID,
        "poll_interval": 3.0,
        "end_time": None,
    }
    kwargs.update(overrides)
    return FluxKontextPredictionTrigger(**kwargs)


@pytest.fixture
def hook():
    """Return the hook instance the trigger builds (class patched where the trigger imports it from)."""
    instance = mock.MagicMock(name="FluxKontextHook()")
    instance.aget_prediction = mock.AsyncMock()
    instance.acancel_prediction = mock.AsyncMock()
    instance.acreate_prediction = mock.AsyncMock()
    instance.aclose = mock.AsyncMock()
    # One wait alone: the shared watcher leaves it to poll on its own (test_watcher.py: shared).
    instance.aget_settings = mock.AsyncMock(return_value=ClientSettings(CONN_ID, "https://api.example"))
    instance.redact = lambda text: text.replace(SECRET_ECHO, "***")
    with mock.patch("airflow_provider_kontext.hooks.kontext.FluxKontextHook") as hook_cls:
        hook_cls.return_value = instance
        instance.cls = hook_cls
        yield instance


@pytest.fixture
def sleeps():
    """Replace ``asyncio.sleep`` of the trigger and of its source; record the requested delays."""
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    fake = SimpleNamespace(sleep=fake_sleep, wait_for=asyncio.wait_for, TimeoutError=asyncio.TimeoutError)
    with (
        mock.patch.object(trigger_module, "asyncio", fake),
        mock.patch.object(source_module, "asyncio", fake),
    ):
        yield delays


def attach_log(trigger: FluxKontextPredictionTrigger) -> mock.Mock:
    """Route the trigger's logger into a mock (LoggingMixin caches its logger in ``_log``)."""
    log = mock.Mock()
    trigger._log = log
    return log


def info_lines(log: mock.Mock) -> list[str]:
    return [c.args[0] % c.args[1:] for c in log.info.call_args_list]


async def collect(trigger: FluxKontextPredictionTrigger) -> list[TriggerEvent]:
    return [event async for event in trigger.run()]


# --- serialization ---------------------------------------------------------------------------------


def test_serialize_round_trip():
    trigger = make_trigger(
        end_time=1_750_000_000.5, cancel_on_kill=False, max_consecutive_errors=4, poll_policy="fixed"
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert kwargs == {
        "prediction_id": PID,
        "flux_kontext_conn_id": CONN_ID,
        "poll_interval": 3.0,
        "end_time": 1_750_000_000.5,
        "cancel_on_kill": False,
        "max_consecutive_errors": 4,
        "poll_policy": "fixed",
        "hook_params": {},
    }
    # What the triggerer does: import the classpath and build it from the kwargs.
    module_name, class_name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)


def test_serialize_kwargs_are_json_primitives():
    _, kwargs = make_trigger(end_time=time.time() + 60, poll_interval="2").serialize()
    assert json.loads(json.dumps(kwargs)) == kwargs
    for name, value in kwargs.items():
        if name == "hook_params":
            assert all(v is None or type(v) in (str, int, float, bool) for v in value.values())
        else:
            assert value is None or type(value) in (str, int, float, bool)
    assert isinstance(kwargs["poll_interval"], float)
    _, from_int = make_trigger(end_time=1_750_000_000).serialize()
    assert type(from_int["end_time"]) is float


def test_defaults_round_trip():
    trigger = FluxKontextPredictionTrigger(prediction_id=PID)
    _, kwargs = trigger.serialize()
    assert kwargs["flux_kontext_conn_id"] == "flux_kontext_default"
    assert kwargs["end_time"] is None
    assert kwargs["cancel_on_kill"] is True
    assert kwargs["poll_policy"] == "adaptive"
    assert FluxKontextPredictionTrigger(**kwargs).serialize() == trigger.serialize()
    # kwargs serialized by an earlier version (no poll_policy) still build a trigger
    del kwargs["poll_policy"]
    assert FluxKontextPredictionTrigger(**kwargs).poll_policy == "adaptive"


def test_unknown_poll_policy_is_refused():
    with pytest.raises(ValueError, match="poll_policy"):
        make_trigger(poll_policy="sometimes")


def test_no_secret_in_serialize_or_repr(monkeypatch):
    conn = {"conn_type": "fluxkontext", "host": "https://api.replicate.com", "password": TOKEN}
    monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
    trigger = FluxKontextPredictionTrigger(prediction_id=PID, end_time=time.time() + 60)
    hook = trigger._hook()
    assert hook.settings.token == TOKEN  # the token is reachable through the conn id ...
    assert TOKEN not in json.dumps(trigger.serialize())  # ... but never in the trigger itself
    assert TOKEN not in repr(trigger)


# --- one event per terminal status -----------------------------------------------------------------


async def test_succeeded(hook, sleeps):
    done = make_prediction(
        "succeeded",
        output="https://replicate.delivery/xezq/out.webp",
        logs="step 28/28\n",
        metrics={"predict_time": 4.2},
        completed_at="2025-05-01T10:00:06+00:00",
    )
    hook.aget_prediction.side_effect = [make_prediction("starting"), make_prediction("processing"), done]
    events = await collect(make_trigger(poll_policy="fixed"))
    assert len(events) == 1
    payload = events[0].payload
    assert payload == prediction_event(done).payload()
    assert payload["status"] == "succeeded"
    assert payload["prediction_id"] == PID
    assert payload["output"] == ["https://replicate.delivery/xezq/out.webp"]
    assert payload["predict_time"] == 4.2
    hook.cls.assert_called_once_with(CONN_ID)
    hook.aget_prediction.assert_awaited_with(PID, retry_limits=mock.ANY)
    assert hook.aget_prediction.await_count == 3
    assert sleeps == [3.0, 3.0]  # waited between polls, not after the last one
    hook.acreate_prediction.assert_not_called()  # the trigger only reads


async def test_failed(hook, sleeps):
    hook.aget_prediction.side_effect = [
        make_prediction("processing"),
        make_prediction("failed", error="NSFW content detected", logs="step 1\nchecking safety\n"),
    ]
    [event] = await collect(make_trigger())
    assert event.payload["status"] == "failed"
    assert event.payload["prediction_id"] == PID
    assert event.payload["error"] == "NSFW content detected"
    assert event.payload["logs_tail"] == "step 1\nchecking safety"
    assert event.payload["output"] == []


async def test_canceled(hook, sleeps):
    hook.aget_prediction.return_value = make_prediction("canceled", logs="step 3\n")
    [event] = await collect(make_trigger())
    assert event.payload["status"] == "canceled"
    assert event.payload["prediction_id"] == PID
    assert event.payload["logs_tail"] == "step 3"
    assert sleeps == [1.0]  # the adaptive policy's short wait before the first poll; none after the last


async def test_aborted(hook, sleeps):
    hook.aget_prediction.side_effect = [
        make_prediction("starting"),
        make_prediction("aborted", error="Cancel-After deadline passed before start"),
    ]
    [event] = await collect(make_trigger())
    assert event.payload["status"] == "aborted"  # terminal: not polled forever
    assert event.payload["error"] == "Cancel-After deadline passed before start"
    assert hook.aget_prediction.await_count == 2


# --- progress --------------------------------------------------------------------------------------


async def test_progress_lines_logged_once(hook, sleeps):
    hook.aget_prediction.side_effect = [
        make_prediction("starting"),
        make_prediction("processing", logs="Loading\n"),
        make_prediction("processing", logs="Loading\nstep 1/28\nstep 2/2"),
        make_prediction("processing", logs="Loading\nstep 1/28\nstep 2/28\n"),
        make_prediction("succeeded", logs="Loading\nstep 1/28\nstep 2/28\ndone", output="https://x/o.png"),
    ]
    trigger = make_trigger()
    log = attach_log(trigger)
    await collect(trigger)
    assert info_lines(log) == [
        f"Prediction {PID} is starting",
        f"Prediction {PID} is processing",
        "model: Loading",
        "model: step 1/28",
        "model: step 2/28",
        "model: done",  # no "succeeded" line: the triggerer logs the event it fires
    ]


# --- errors ----------------------------------------------------------------------------------------


class ScriptedApi:
    """Serve ``GET /v1/predictions/{PID}`` on 127.0.0.1 from a script (the last answer repeats).

    ``GET /v1/predictions/{PID}`` on 127.0.0.1 answering from a script (the last answer repeats):
    a ``(status, json)`` pair, ``"garbled"`` (no usable HTTP answer) or ``"hang"``.
    """

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.polls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.polls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer == "hang":
            await asyncio.Event().wait()
        if answer == "garbled":  # a broken answer, then the connection closes
            assert request.transport is not None
            request.transport.write(b"HTTP/1.1 not-a-status\r\n\r\n")
            request.transport.close()
            return web.Response()
        status, body = answer
        response = web.json_response(body, status=status)
        # A fresh connection each time: aiohttp itself resends a GET once when a reused keep-alive
        # connection turns out closed, which would hide the dropped connection from the hook.
        response.force_close()
        return response


@pytest.fixture
async def api(monkeypatch):
    """Return the real hook (not the mock) polling a scripted API; its retry waits are recorded, not slept."""
    scripted = ScriptedApi()
    app = web.Application()
    app.router.add_get(f"/v1/predictions/{PID}", scripted.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    conn = {"conn_type": "fluxkontext", "host": f"http://127.0.0.1:{server.port}", "password": TOKEN}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    scripted.retry_waits = []  # type: ignore[attr-defined]

    async def record(self: FluxKontextHook, seconds: float) -> None:
        scripted.retry_waits.append(seconds)  # type: ignore[attr-defined]

    monkeypatch.setattr(FluxKontextHook, "_asleep", record)
    try:
        yield scripted
    finally:
        await server.close()


def as_json(prediction: Prediction) -> dict[str, Any]:
    return prediction.model_dump(mode="json", exclude_none=True)


@pytest.mark.parametrize(
    "failure",
    [
        (502, {"title": "Bad Gateway"}),
        "garbled",
        (429, {"detail": "Request was throttled. Your rate limit resets in ~1s."}),
        (200, {"unexpected": True}),  # an unreadable answer: tolerated for a poll
    ],
    ids=["5xx", "transport", "429", "malformed"],
)
async def test_transient_errors_then_success(api, sleeps, failure):
    api.answers = [
        (200, as_json(make_prediction("processing"))),
        failure,
        failure,
        (200, as_json(make_prediction("succeeded", output="https://x/o.png"))),
    ]
    trigger = make_trigger()
    [event] = await collect(trigger)
    assert event.payload["status"] == "succeeded"
    assert event.payload["output"] == ["https://x/o.png"]
    assert api.polls == 4
    assert len(api.retry_waits) == 2  # the one retry layer: the hook's, within a poll
    assert asyncio.get_running_loop() not in SharedAsyncClient._clients  # closed after the event


async def test_too_many_consecutive_errors(api, sleeps):
    api.answers = [(503, {"title": "Service Unavailable"})]
    events = await collect(make_trigger(max_consecutive_errors=3))
    assert len(events) == 1
    assert events[0].payload["status"] == "error"
    assert events[0].payload["prediction_id"] == PID
    assert "4 polls in a row failed" in events[0].payload["message"]
    assert "503" in events[0].payload["message"]
    assert api.polls == 4  # 3 tolerated, the 4th ends it
    assert len(api.retry_waits) == 3
    assert asyncio.get_running_loop() not in SharedAsyncClient._clients


async def test_the_trigger_hands_its_budget_to_the_hook(hook, sleeps):
    hook.aget_prediction.return_value = make_prediction("succeeded", output="https://x/o.png")
    await collect(make_trigger(max_consecutive_errors=4, poll_interval=3.0, end_time=1_750_000_000.0))
    hook.aget_prediction.assert_awaited_once_with(
        PID, retry_limits=RetryLimits(retries=4, tolerate=True, deadline=1_750_000_000.0, grace=3.0)
    )


@pytest.mark.parametrize(
    "exc",
    [FluxKontextAuthError(status=401, title="Unauthorized"), FluxKontextNotFoundError(status=404)],
    ids=["auth", "not-found"],
)
async def test_client_error_is_immediate(hook, sleeps, exc):
    hook.aget_prediction.side_effect = exc
    events = await collect(make_trigger(max_consecutive_errors=10))
    assert [e.payload["status"] for e in events] == ["error"]
    assert str(exc) in events[0].payload["message"]
    assert hook.aget_prediction.await_count == 1
    assert sleeps == [1.0]  # only the short wait before the first poll


async def test_malformed_connection_gives_error_event(hook, sleeps):
    hook.aget_prediction.side_effect = ValueError("extra 'timeout' must be a number")
    [event] = await collect(make_trigger())
    assert event.payload["status"] == "error"
    assert "Cannot poll" in event.payload["message"]
    assert "timeout" in event.payload["message"]


# --- adaptive polling ------------------------------------------------------------------------------


def tqdm(step: int, total: int = 28) -> str:
    return f"{int(step / total * 100):3d}%|###       | {step}/{total} [00:01<00:02, 4.00it/s]\n"


async def test_adaptive_polls_when_the_progress_bar_ends(hook, sleeps):
    frozen = SimpleNamespace(time=lambda: 1_750_000_000.0)  # the policy's clock, so delays are exact
    hook.aget_prediction.side_effect = [
        make_prediction("processing", logs="Using seed: 1\n" + "".join(tqdm(i) for i in range(21))),
        make_prediction(
            "succeeded",
            logs="Using seed: 1\n" + "".join(tqdm(i) for i in range(29)),
            output="https://x/o.png",
        ),
    ]
    trigger = make_trigger(poll_interval=3.0)
    log = attach_log(trigger)
    with mock.patch("airflow_provider_kontext.edits.progress.time", frozen):
        [event] = await collect(trigger)
    assert event.payload["status"] == "succeeded"
    # a moment before the first poll, then until the bar's end: 8 steps of 0.25 s + half a step
    assert sleeps == [1.0, pytest.approx(8 * 0.25 + 0.125)]
    assert [c.args[0] for c in log.info.call_args_list] == [
        f"Prediction {PID} is processing",
        "model: Using seed: 1",
        "model: " + tqdm(28).strip(),  # one bar line, not one per step
    ]


async def test_fixed_policy_polls_every_interval(hook, sleeps):
    hook.aget_prediction.side_effect = [
        make_prediction("processing", logs="".join(tqdm(i) for i in range(21))),
        make_prediction("processing", logs="".join(tqdm(i) for i in range(28))),
        make_prediction("succeeded", logs="".join(tqdm(i) for i in range(29)), output="https://x/o.png"),
    ]
    await collect(make_trigger(poll_interval=3.0, poll_policy="fixed"))
    assert sleeps == [3.0, 3.0]  # no wait before the first poll, none after the last


# --- deadline --------------------------------------------------------------------------------------


async def test_deadline_passed_gives_timeout(hook, sleeps):
    hook.aget_prediction.return_value = make_prediction("processing")
    [event] = await collect(make_trigger(end_time=time.time() - 1))
    assert event.payload["status"] == "timeout"
    assert event.payload["prediction_id"] == PID
    assert "processing" in event.payload["message"]
    hook.acancel_prediction.assert_not_called()  # the operator cancels, with the task's context


async def test_a_poll_stuck_past_the_deadline_ends_in_timeout(api, sleeps):
    """Check that a slow or throttling API does not hold the trigger past ``end_time``.

    A slow or throttling API must not hold the trigger past end_time (Airflow's own defer timeout
    would then fail the task without the cancel that the ``timeout`` event brings).
    """
    api.answers = ["hang"]
    # Without the cut-off the poll waits for the read timeout (30 s), far past the deadline.
    started = time.monotonic()
    [event] = await asyncio.wait_for(collect(make_trigger(poll_interval=0.1, end_time=time.time() + 0.2)), 60)
    assert event.payload["status"] == "timeout"
    assert time.monotonic() - started < 15


async def test_a_poll_still_failing_at_the_deadline_ends_in_timeout(api, sleeps):
    api.answers = [(429, {"detail": "Request was throttled. Your rate limit resets in ~30s."})]
    [event] = await collect(make_trigger(poll_interval=1.0, end_time=time.time() + 5))
    assert event.payload["status"] == "timeout"
    assert api.polls == 1  # the 30 s wait would pass the deadline: not slept, not retried
    assert api.retry_waits == []


async def test_sleep_never_overshoots_the_deadline(hook, sleeps):
    hook.aget_prediction.side_effect = [make_prediction("processing"), make_prediction("succeeded")]
    await collect(make_trigger(poll_interval=600.0, end_time=time.time() + 5))
    assert len(sleeps) == 2  # before the first poll (adaptive) and between the two
    assert all(0 < delay <= 5 for delay in sleeps)


async def test_recreated_from_kwargs_resumes_polling(hook, sleeps):
    """A triggerer restart: only the serialized kwargs survive; the new instance just polls on."""
    _, kwargs = make_trigger(end_time=time.time() + 600).serialize()
    restarted = FluxKontextPredictionTrigger(**json.loads(json.dumps(kwargs)))
    hook.aget_prediction.side_effect = [
        make_prediction("processing", logs="step 14/28\n"),
        make_prediction("succeeded", output="https://x/o.png"),
    ]
    [event] = await collect(restarted)
    assert event.payload["status"] == "succeeded"
    assert event.payload["prediction_id"] == PID
    hook.cls.assert_called_once_with(CONN_ID)
    hook.aget_prediction.assert_awaited_with(PID, retry_limits=mock.ANY)
    hook.acreate_prediction.assert_not_called()


# --- cleanup ---------------------------------------------------------------------------------------


async def test_aclose_after_success(hook, sleeps):
    hook.aget_prediction.return_value = make_prediction("succeeded", output="https://x/o.png")
    await collect(make_trigger())
    hook.aclose.assert_awaited_once()


async def test_aclose_after_error_event(hook, sleeps):
    hook.aget_prediction.side_effect = FluxKontextAuthError(status=403)
    await collect(make_trigger())
    hook.aclose.assert_awaited_once()


async def test_aclose_when_polling_raises_unexpectedly(hook, sleeps):
    hook.aget_prediction.side_effect = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        await collect(make_trigger())
    hook.aclose.assert_awaited_once()


async def test_aclose_when_the_triggerer_cancels_the_run(hook):
    """The triggerer cancels a trigger (task deferral ended, shutdown) while it sleeps."""
    hook.aget_prediction.return_value = make_prediction("processing")
    sleep = mock.AsyncMock(side_effect=[None, None, asyncio.CancelledError()])
    with (
        mock.patch.object(trigger_module, "asyncio", SimpleNamespace(sleep=sleep)),
        mock.patch.object(source_module, "asyncio", SimpleNamespace(sleep=sleep)),
        pytest.raises(asyncio.CancelledError),
    ):
        await collect(make_trigger())
    assert hook.aget_prediction.await_count == 2
    hook.aclose.assert_awaited_once()


# --- on_kill ---------------------------------------------------------------------------------------


async def test_on_kill_cancels(hook):
    hook.acancel_prediction.return_value = make_prediction("canceled")
    trigger = make_trigger(cancel_on_kill=True)
    log = attach_log(trigger)
    await trigger.on_kill()
    hook.acancel_prediction.assert_awaited_once_with(PID)
    hook.aclose.assert_awaited_once()
    assert any("canceled on kill" in line for line in info_lines(log))


async def test_on_kill_disabled_does_nothing(hook):
    await make_trigger(cancel_on_kill=False).on_kill()
    hook.acancel_prediction.assert_not_called()
    hook.cls.assert_not_called()


async def test_on_kill_cancel_failure_is_logged_not_raised(hook):
    hook.acancel_prediction.side_effect = FluxKontextServerError(status=500)
    trigger = make_trigger()
    log = attach_log(trigger)
    await trigger.on_kill()
    log.warning.assert_called_once()
    assert "Could not cancel" in log.warning.call_args.args[0]
    hook.aclose.assert_awaited_once()


async def test_a_secret_echoed_into_the_error_and_logs_is_redacted_in_the_event(hook, sleeps):
    hook.aget_prediction.return_value = make_prediction(
        "failed", error=f"proxy said: Bearer {SECRET_ECHO}", logs=f"auth {SECRET_ECHO}\n"
    )
    [event] = await collect(make_trigger())
    assert SECRET_ECHO not in json.dumps(event.payload)
    assert "proxy said: Bearer ***" in event.payload["error"]


# --- hook_params ------------------------------------------------------------------------------------


async def test_hook_params_round_trip_and_reach_the_hook(hook, sleeps):
    trigger = make_trigger(hook_params={"timeout": 12.5, "max_retries": 2})
    _, kwargs = trigger.serialize()
    assert kwargs["hook_params"] == {"timeout": 12.5, "max_retries": 2}
    assert json.loads(json.dumps(kwargs)) == kwargs
    rebuilt = FluxKontextPredictionTrigger(**kwargs)  # what a restarted triggerer does
    hook.aget_prediction.return_value = make_prediction("succeeded", output="https://x/y.png")
    events = await collect(rebuilt)
    assert events[0].payload["status"] == "succeeded"
    hook.cls.assert_called_once_with(CONN_ID, timeout=12.5, max_retries=2)


def test_hook_params_keep_json_primitives_only():
    trigger = make_trigger(hook_params={"timeout": 5, "when": object(), "nested": {"a": 1}, "unset": None})
    assert trigger.serialize()[1]["hook_params"] == {"timeout": 5, "unset": None}


def test_kwargs_of_an_earlier_version_without_hook_params_still_build():
    _, kwargs = make_trigger().serialize()
    del kwargs["hook_params"]
    assert FluxKontextPredictionTrigger(**kwargs).hook_params == {}
