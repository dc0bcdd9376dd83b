"""Provide the sync hook tests' fixtures: a connection from the environment, recorded sleeps, logs.

Connections come from ``AIRFLOW_CONN_<ID>`` environment variables holding JSON; ``_sleep`` is
replaced so retries do not wait and the waits they asked for can be asserted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hook_api import TOKEN

from airflow_provider_kontext.hooks.kontext import FluxKontextHook


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Define a connection through ``AIRFLOW_CONN_<ID>`` (JSON), as deployments without a DB do."""

    def _set(conn_id: str = "flux_kontext_default", **fields: Any) -> None:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "fluxkontext", **fields})
        )

    return _set


@pytest.fixture(autouse=True)
def default_conn(monkeypatch: pytest.MonkeyPatch, set_conn: Callable[..., None]) -> None:
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    set_conn(password=TOKEN)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the waits the retry policy asked for, instead of really sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: waits.append(seconds))
    return waits


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged: stdlib records (caplog) and the hook's structlog lines (printed)."""
    caplog.set_level(logging.DEBUG)

    def read() -> str:
        out = capsys.readouterr()
        return caplog.text + out.out + out.err

    return read


@pytest.fixture
def hook() -> FluxKontextHook:
    return FluxKontextHook()
