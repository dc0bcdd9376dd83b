"""Test the emulator's faults and its packaging (the pytest plugin, the command line).

Real HTTP to an emulator on 127.0.0.1 started for the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import requests

from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.faults import CREATE, NSFW_ERROR, PREDICTION
from airflow_provider_kontext.testing.service import RequestRecord

from .helpers import (
    DEV,
    FAST,
    assert_problem,
    create,
    edit_input,
    finish,
    output_image,
)

pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin", "pytester"]


# --- faults ---------------------------------------------------------------------------------------


def test_throttle_with_and_without_retry_after(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    emu = kontext_emulator
    emu.faults.throttle(1, method="POST", path=CREATE, retry_after=2)
    emu.faults.throttle(1, method="POST", path=CREATE)
    first = create(http, emu)
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "2"
    assert first.json() == {"detail": "Request was throttled. Expected available in 1 second."}
    second = create(http, emu)
    assert second.status_code == 429
    assert "Retry-After" not in second.headers
    assert http.get(f"{emu.base_url}/v1/account").status_code == 200  # not a create
    assert create(http, emu).status_code == 201
    assert emu.created_count == 1
    assert [r.status for r in emu.requests] == [429, 429, 200, 201]


def test_throttle_by_probability_is_seeded(http: requests.Session) -> None:
    def statuses(seed: int) -> list[int]:
        with FluxKontextEmulator(fault_seed=seed, **FAST) as emu:  # type: ignore[arg-type]
            emu.faults.throttle(probability=0.5, path="/v1/account")
            return [http.get(f"{emu.base_url}/v1/account").status_code for _ in range(40)]

    first = statuses(3)
    assert first == statuses(3)
    assert 5 < first.count(429) < 35


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors(kontext_emulator: FluxKontextEmulator, http: requests.Session, status: int) -> None:
    emu = kontext_emulator
    emu.faults.server_error(2, status=status, method="GET", path=PREDICTION)
    url = create(http, emu).json()["urls"]["get"]
    assert_problem(http.get(url), status)
    assert_problem(http.get(url), status)
    assert http.get(url).status_code == 200


def test_server_error_as_proxy_html_page(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    kontext_emulator.faults.server_error(status=502, html=True)
    response = http.get(f"{kontext_emulator.base_url}/v1/account")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>502 Bad Gateway</title>" in response.text


def test_drop_connection_before_processing(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    emu = kontext_emulator
    emu.faults.drop_connection(1, method="POST", path=CREATE)
    with pytest.raises(requests.ConnectionError):
        create(http, emu)
    assert emu.created_count == 0
    assert create(http, emu).status_code == 201
    assert emu.requests[0] == RequestRecord("POST", DEV, None)


def test_drop_connection_after_processing(kontext_emulator: FluxKontextEmulator) -> None:
    emu = kontext_emulator
    emu.faults.drop_connection(1, method="POST", path=CREATE, after_processing=True)
    with httpx.Client(trust_env=False) as client, pytest.raises(httpx.TransportError):
        client.post(f"{emu.base_url}{DEV}", json={"input": edit_input()})
    assert emu.created_count == 1  # created, but the client never heard
    (record,) = emu.predictions.values()
    assert record.input["prompt"] == "make the background blue"


def test_slow_responses(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    emu.faults.slow(0.3, path="/v1/account")
    started = time.monotonic()
    assert http.get(f"{emu.base_url}/v1/account").status_code == 200
    assert time.monotonic() - started >= 0.3
    emu.faults.slow(0.5, method="POST", path=CREATE, after_processing=True)
    with pytest.raises(requests.ReadTimeout):
        http.post(f"{emu.base_url}{DEV}", json={"input": edit_input()}, timeout=0.2)
    assert emu.created_count == 1
    started = time.monotonic()
    http.get(f"{emu.base_url}/v1/account")
    assert time.monotonic() - started < 0.25  # used up


@pytest.mark.parametrize(
    ("arm", "status", "error"),
    [
        ({"nsfw": True}, "failed", NSFW_ERROR),
        ({}, "failed", "fault injection"),
        ({"error": "CUDA out of memory"}, "failed", "CUDA out of memory"),
    ],
)
def test_fail_predictions(
    kontext_emulator: FluxKontextEmulator,
    http: requests.Session,
    arm: dict[str, Any],
    status: str,
    error: str,
) -> None:
    kontext_emulator.faults.fail_predictions(1, **arm)
    failed = finish(http, kontext_emulator)
    assert failed["status"] == status
    assert error in failed["error"]
    assert failed["output"] is None
    assert finish(http, kontext_emulator)["status"] == "succeeded"


def test_forced_cancel_and_abort(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    kontext_emulator.faults.cancel_predictions(1)
    kontext_emulator.faults.abort_predictions(1)
    canceled, aborted = finish(http, kontext_emulator), finish(http, kontext_emulator)
    assert canceled["status"] == "canceled"
    assert canceled["started_at"] is not None
    assert aborted["status"] == "aborted"
    assert "started_at" not in aborted  # not nullable in the OpenAPI description: left out


def test_images_api_shape(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    kontext_emulator.faults.images_api_shape(1)
    before = int(time.time())
    response = create(http, kontext_emulator)
    body = response.json()
    assert set(body) == {"created", "data"}
    assert before <= body["created"] <= time.time()
    (item,) = body["data"]
    image, _ = output_image(http, {"output": item["url"]})
    assert image.format == "WEBP"
    parsed = Prediction.model_validate(body)
    assert parsed.is_terminal
    assert parsed.output_urls == [item["url"]]
    assert create(http, kontext_emulator).json()["status"] == "starting"  # used up


def test_http_control_endpoints(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    base = kontext_emulator.base_url
    armed = http.post(
        f"{base}/_emulator/faults",
        json=[
            {"fault": "throttle", "count": 1, "method": "POST", "path": CREATE, "retry_after": 1},
            {"fault": "fail_predictions", "nsfw": True},
        ],
    )
    assert armed.status_code == 200
    assert len(armed.json()["requests"]) == 1
    assert armed.json()["predictions"][0]["outcome"] == "failed"
    assert create(http, kontext_emulator).status_code == 429
    assert finish(http, kontext_emulator)["error"] == NSFW_ERROR

    state = http.get(f"{base}/_emulator/state").json()
    assert state["created_count"] == 1
    assert state["statuses"] == {"failed": 1}
    assert state["responses"]["429"] == 1
    assert state["faults"]["requests"] == []

    assert_problem(http.post(f"{base}/_emulator/faults", json={"fault": "explode"}), 400)
    assert_problem(http.post(f"{base}/_emulator/faults", json={"fault": "throttle", "colour": "red"}), 400)
    http.post(f"{base}/_emulator/faults", json={"fault": "server_error", "status": 503})
    assert http.post(f"{base}/_emulator/faults", json={"fault": "clear"}).json()["requests"] == []

    reset = http.post(f"{base}/_emulator/reset").json()
    assert reset["created_count"] == 0
    assert reset["request_count"] == 0
    assert kontext_emulator.predictions == {}
    assert kontext_emulator.requests == []


# --- packaging ------------------------------------------------------------------------------------


def test_package_import_is_cheap() -> None:
    code = (
        "import sys, airflow_provider_kontext.testing as t; "
        "heavy = [m for m in ('fastapi', 'uvicorn', 'PIL', 'starlette') if m in sys.modules]; "
        "assert not heavy, heavy; assert t.FluxKontextEmulator.__name__ == 'FluxKontextEmulator'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_command_line_runs_in_foreground_until_sigterm(http: requests.Session) -> None:
    command = [
        sys.executable,
        "-m",
        "airflow_provider_kontext.testing.emulator",
        "--port",
        "0",
        "--token",
        "t0k",
        "--path-prefix",
        "/replicate",
        "--prediction-seconds",
        "0.1",
        "--retention-seconds",
        "60",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:")
            assert base_url.endswith("/replicate")
            assert http.get(f"{base_url}/v1/account").status_code == 401
            account = http.get(f"{base_url}/v1/account", headers={"Authorization": "Bearer t0k"})
            assert account.json()["username"] == "emulator"
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0


def test_pytest_plugin_fixture_and_marker(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin"]')
    pytester.makepyfile(
        """
        import pytest
        import requests

        @pytest.mark.kontext_emulator(token="abc", path_prefix="/r", prediction_seconds=0.1)
        def test_marked(kontext_emulator):
            assert kontext_emulator.running and kontext_emulator.base_url.endswith("/r")
            assert kontext_emulator.config.timing.prediction_seconds == 0.1
            with requests.Session() as http:
                http.trust_env = False
                assert http.get(kontext_emulator.base_url + "/v1/account").status_code == 401

        def test_default(kontext_emulator):
            assert kontext_emulator.config.timing.prediction_seconds == 3.0
            assert kontext_emulator.base_url.startswith("http://127.0.0.1:")
        """
    )
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error::pytest.PytestUnknownMarkWarning"
    )
    result.assert_outcomes(passed=2)
