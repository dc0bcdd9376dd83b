"""Test ``hook_params`` from a DAG to the hook, and ``deferrable``'s default from Airflow's config.

``hook_params`` from a DAG to the hook (operator, sensor, trigger), and ``deferrable``'s default
from Airflow's ``[operators] default_deferrable``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest import mock

import pytest

from airflow_provider_kontext.hooks.connection import CONN_TYPE, DEFAULT_CONN_ID, SETTINGS, checked_overrides
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
from airflow_provider_kontext.sensors.kontext import FluxKontextPredictionSensor

TOKEN = "r8_HookParamsTestToken_3e8a"


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"timeout": 45, "max_retries": 2, "backoff_max": 9}
    value = json.dumps({"conn_type": CONN_TYPE, "password": TOKEN, "extra": extra})
    monkeypatch.setenv(f"AIRFLOW_CONN_{DEFAULT_CONN_ID.upper()}", value)


def test_every_setting_can_be_overridden_by_the_hook(conn: None) -> None:
    overrides = {"timeout": 7, "connect_timeout": 2, "max_retries": 0, "backoff_base": 0.1}
    settings = FluxKontextHook(**overrides).settings
    assert (settings.timeout, settings.connect_timeout, settings.max_retries) == (7, 2, 0)
    assert settings.backoff_base == 0.1
    assert settings.backoff_max == 9  # not overridden: the connection's extra
    assert isinstance(settings.max_retries, int)


def test_overrides_of_none_leave_the_extra(conn: None) -> None:
    assert FluxKontextHook(timeout=None).settings.timeout == 45


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"timeout": 0}, "hook_params 'timeout' must be positive"),
        ({"max_retries": -1}, "hook_params 'max_retries' must be at least 0"),
        ({"max_retries": 1.5}, "hook_params 'max_retries' must be a whole number"),
        ({"connect_timeout": True}, "hook_params 'connect_timeout' must be a number"),
        ({"max_retries": "many"}, "hook_params 'max_retries' must be a number"),
        ({"retries": 3}, "hook_params: unknown retries; allowed: timeout, connect_timeout"),
        ({"token": "r8_x"}, "unknown token"),
    ],
)
def test_bad_hook_params_name_the_setting(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checked_overrides(params)
    with pytest.raises(ValueError, match=message):
        FluxKontextHook(**params)
    with pytest.raises(ValueError, match=message):  # when the DAG is parsed
        FluxKontextEditOperator(task_id="edit", prompt="p", hook_params=params)
    with pytest.raises(ValueError, match=message):
        FluxKontextPredictionSensor(task_id="wait", prediction_id="p", hook_params=params)


def test_allowed_names_are_the_settings_table() -> None:
    every = {setting.name: setting.minimum + 1 for setting in SETTINGS}
    assert set(checked_overrides(every)) == set(every)


def test_hooks_with_different_params_do_not_share_cached_settings(conn: None) -> None:
    async def both() -> tuple[float, float]:
        first = await FluxKontextHook(timeout=5).aget_settings()
        second = await FluxKontextHook(timeout=6).aget_settings()
        plain = await FluxKontextHook().aget_settings()
        assert plain.timeout == 45
        return first.timeout, second.timeout

    assert asyncio.run(both()) == (5, 6)


def test_operator_builds_its_hook_and_trigger_with_the_params() -> None:
    params = {"timeout": 12, "max_retries": 1}
    op = FluxKontextEditOperator(
        task_id="edit", prompt="p", input_image="https://x/y.png", hook_params=params, deferrable=True
    )
    assert op.hook._overrides == params
    with mock.patch.object(FluxKontextHook, "__init__", return_value=None) as init:
        FluxKontextPredictionSensor(task_id="wait", prediction_id="p", hook_params=params).hook
    init.assert_called_once_with(DEFAULT_CONN_ID, **params)


@pytest.mark.parametrize(("setting", "expected"), [("True", True), ("False", False), (None, False)])
def test_operator_deferrable_follows_airflows_default_deferrable(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, expected: bool
) -> None:
    if setting is None:  # Airflow's own default
        monkeypatch.delenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", setting)
    assert FluxKontextEditOperator(task_id="edit", prompt="p").deferrable is expected
    assert (
        FluxKontextEditOperator(task_id="e2", prompt="p", deferrable=not expected).deferrable is not expected
    )
