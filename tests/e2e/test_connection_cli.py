"""``airflow connections test`` in a real Airflow against the emulator: the account on success (with
``-v``, as the README says), the "did you mean http://" hint for a scheme-less host, no RFC 3986
warning about the connection type, and no token in the output."""

from __future__ import annotations

import json

from airflow_provider_kontext.testing.emulator import KontextEmulator

from .conftest import TOKEN, Airflow

ENABLED = {"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"}


def _test(airflow: Airflow, connection: dict[str, object]) -> str:
    env = {**ENABLED, "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection)}
    result = airflow.run_cli(["connections", "test", "-v", "flux_kontext_default"], env=env)
    assert TOKEN not in result.output
    assert "RFC3986" not in result.output
    return result.output


def test_connections_test_prints_the_account(airflow: Airflow, emulator: KontextEmulator) -> None:
    output = _test(airflow, {"conn_type": "fluxkontext", "host": emulator.base_url, "password": TOKEN})
    assert "Connection success!" in output
    assert f"Connected to {emulator.base_url} as emulator" in output


def test_connections_test_hints_at_http_for_a_scheme_less_host(
    airflow: Airflow, emulator: KontextEmulator
) -> None:
    host = emulator.base_url.removeprefix("http://")
    output = _test(
        airflow, {"conn_type": "fluxkontext", "host": host, "password": TOKEN, "extra": {"max_retries": 0}}
    )
    assert "Connection failed!" in output
    assert f"did you mean 'http://{host}'?" in " ".join(output.split())
