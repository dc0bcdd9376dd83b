"""Provide the edit operator tests' fixtures: a mock hook, a worker that never sleeps, a first try."""

from __future__ import annotations

from unittest import mock

import pytest

from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

from .helpers import (
    NEW_PID,
    OLD_PID,
    SECRET_ECHO,
    STATE_KEY,
    FakeStore,
    make_context,
    make_op,
    make_prediction,
    run_deferring,
)


@pytest.fixture
def hook():
    """Replace the operator's ``hook`` cached_property with a spec'd mock for every instance."""
    fake = mock.create_autospec(FluxKontextHook, instance=True)
    fake.create_prediction.return_value = make_prediction("starting")
    fake.redact.side_effect = lambda text: text.replace(SECRET_ECHO, "***")
    with mock.patch.object(FluxKontextEditOperator, "hook", fake):
        yield fake


@pytest.fixture
def no_sleep():
    with mock.patch("airflow_provider_kontext.operators.kontext.time.sleep") as sleep:
        yield sleep


@pytest.fixture
def first_try(hook):
    """Run try 1 up to its deferral; return the store it left (XComs do not survive, the store does)."""
    hook.create_prediction.return_value = make_prediction("processing", OLD_PID)
    store = FakeStore()
    run_deferring(make_op(), make_context(store))
    assert store.data[STATE_KEY]["id"] == OLD_PID
    hook.reset_mock(return_value=True, side_effect=True)
    hook.create_prediction.return_value = make_prediction("starting", NEW_PID)
    hook.redact.side_effect = lambda text: text.replace(SECRET_ECHO, "***")
    return store
