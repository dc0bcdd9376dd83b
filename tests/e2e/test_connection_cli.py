"""Test ``airflow connections test`` in a real Airflow against the emulator.

``airflow connections test`` in a real Airflow against the emulator: the account on success (with
``-v``, as docs/connection.md says), the "did you mean http://" hint for a scheme-less host, no RFC 3986
warning about the connection type, and no token in the output; and the UI's Test button on 3.3,
by the request its UI sends, with and without a stored port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import urlsplit

from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

from .conftest import TOKEN, Airflow

ENABLED = {"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"}


def _test(airflow: Airflow, connection: dict[str, object]) -> str:
    env = {**ENABLED, "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT": json.dumps(connection)}
    result = airflow.run_cli(["connections", "test", "-v", "flux_kontext_default"], env=env)
    assert TOKEN not in result.output
    assert "RFC3986" not in result.output
    return result.output


def test_connections_test_prints_the_account(airflow: Airflow, emulator: FluxKontextEmulator) -> None:
    output = _test(airflow, {"conn_type": "fluxkontext", "host": emulator.base_url, "password": TOKEN})
    assert "Connection success!" in output
    assert f"Connected to {emulator.base_url} as emulator" in output


def test_connections_test_hints_at_http_for_a_scheme_less_host(
    airflow: Airflow, emulator: FluxKontextEmulator
) -> None:
    host = emulator.base_url.removeprefix("http://")
    output = _test(
        airflow, {"conn_type": "fluxkontext", "host": host, "password": TOKEN, "extra": {"max_retries": 0}}
    )
    assert "Connection failed!" in output
    assert f"did you mean 'http://{host}'?" in " ".join(output.split())


# The request body of the Test button in Airflow 3.3's connection list, as its UI builds it
# (``port: Number(connection.port)``, so 0 for an empty port), sent to the real API app.
_UI_TEST_BUTTON = """
import json, sys
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app
from airflow.models.connection import Connection
from airflow.utils.session import create_session

conn_id, host, port, token = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None, sys.argv[4]
with create_session() as session:
    session.query(Connection).filter(Connection.conn_id == conn_id).delete()
    session.add(Connection(conn_id=conn_id, conn_type="fluxkontext", host=host, port=port, password=token))
client = TestClient(create_app())
headers = {"Authorization": "Bearer " + client.get("/auth/token").json()["access_token"]}
stored = client.get(f"/api/v2/connections/{conn_id}", headers=headers).json()
fields = ("conn_type", "description", "host", "login", "password", "schema")
body = {key: stored.get(key) or "" for key in fields}
body.update(connection_id=conn_id, extra=stored.get("extra") or "{}", port=stored["port"] or 0)
answer = client.post("/api/v2/connections/test", json=body, headers=headers)
print("ANSWER", json.dumps([answer.status_code, answer.json()]))
"""


def _press_test_button(airflow: Airflow, conn_id: str, host: str, port: int) -> tuple[int, object]:
    env = {**airflow.env, **ENABLED, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}
    proc = subprocess.run(
        [sys.executable, "-c", _UI_TEST_BUTTON, conn_id, host, str(port), TOKEN],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ANSWER ")]
    status, answer = json.loads(line.removeprefix("ANSWER "))
    return status, answer


def test_test_button_on_airflow_3_3_needs_a_stored_port(
    airflow: Airflow, emulator: FluxKontextEmulator
) -> None:
    """Check docs/connection.md on the Test button: "Bad Request" without a port, the account with one.

    Should the first assertion fail, Airflow has fixed its bug: drop the docs' workaround.
    """
    status, answer = _press_test_button(airflow, "kontext_no_port", emulator.base_url, 0)
    assert status == 400, answer
    port = urlsplit(emulator.base_url).port or 0
    status, answer = _press_test_button(airflow, "kontext_port", emulator.base_url, port)
    assert status == 200, answer
    assert answer == {
        "status": True,
        "message": f"Connected to {emulator.base_url} as emulator (Kontext Emulator)",
    }
