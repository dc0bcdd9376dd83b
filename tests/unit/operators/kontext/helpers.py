"""Build the edit operator tests' predictions, contexts, operators and the task state store."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from factories import api_prediction

from airflow_provider_kontext.compat import TaskDeferred
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

PID = "gm3qorzdhgbfurvjtvhg6dckhu"


OLD_PID = "old0prediction0from0try1"


NEW_PID = "new0prediction0from0try2"


IMAGE_URL = "https://example.com/cat.png"


OUT_URL = "https://replicate.delivery/xezq/server-chosen-name.webp"


PROMPT = "Make it a snowy winter scene"


TOKEN = "r8_OperatorTestToken_9d2b4f61"  # recognisable, so a leak is easy to find


STATE_KEY = FluxKontextEditOperator.STATE_KEY


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64)


SECRET_ECHO = "r8_ECHOED_BY_A_PROXY"


def make_prediction(status: str, prediction_id: str | None = PID, **fields: Any) -> Prediction:
    return api_prediction(prediction_id, status, **fields)


def succeeded(prediction_id: str | None = PID, output: Any = OUT_URL, **fields: Any) -> Prediction:
    return make_prediction(
        "succeeded",
        prediction_id,
        output=output,
        completed_at="2025-05-01T10:00:06+00:00",
        metrics={"predict_time": 4.2},
        **fields,
    )


class FakeStore:
    """The task state store's get/set/delete over a dict (survives "retries" within a test)."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = dict(data or {})
        self.calls: list[tuple[str, str]] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.calls.append(("get", key))
        return self.data.get(key, default)

    def set(self, key: str, value: Any, *, retention: timedelta | None = None) -> None:
        assert value is not None
        json.dumps(value)  # the real store accepts JSON values only
        self.calls.append(("set", key))
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.data.pop(key, None)


def make_context(
    store: Any = "new", outlet_events: Any = None, *, try_number: int = 1, max_tries: int = 0
) -> dict[str, Any]:
    """Return a fake context; ``store=None`` leaves the task state store out (Airflow < 3.3)."""
    ti = mock.MagicMock(
        name="ti", try_number=try_number, max_tries=max_tries, dag_id="dag", run_id="run", task_id="edit"
    )
    ti.map_index = -1
    dag_run = mock.MagicMock(name="dag_run", clear_number=0, start_date=None)
    context: dict[str, Any] = {"ti": ti, "dag_run": dag_run}
    if store is not None:
        context["task_state_store"] = FakeStore() if store == "new" else store
    if outlet_events is not None:
        context["outlet_events"] = outlet_events
    return context


def pushed(context: dict[str, Any]) -> dict[str, Any]:
    return {c.kwargs["key"]: c.kwargs["value"] for c in context["ti"].xcom_push.call_args_list}


def make_op(**kwargs: Any) -> FluxKontextEditOperator:
    kwargs.setdefault("task_id", "edit")
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("input_image", IMAGE_URL)
    op = FluxKontextEditOperator(**kwargs)
    op._cached_logger = mock.Mock(name="log")  # where the Task SDK operator caches its logger
    return op


def logged(op: FluxKontextEditOperator, level: str = "info") -> list[str]:
    return [c.args[0] % c.args[1:] for c in getattr(op._cached_logger, level).call_args_list]


def sent_input(hook: mock.Mock) -> dict[str, Any]:
    hook.create_prediction.assert_called_once()
    return hook.create_prediction.call_args.args[1]


def run_deferring(op: FluxKontextEditOperator, context: dict[str, Any]) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as info:
        op.execute(context)
    return info.value
