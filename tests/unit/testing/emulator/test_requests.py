"""Test the emulator's answers to requests and errors, sync mode, deadlines, cancel, retention.

Real HTTP to an emulator on 127.0.0.1 started for the test.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.create_request import parse_cancel_after
from airflow_provider_kontext.testing.service import RequestRecord

from .helpers import (
    DEV,
    IMAGE,
    assert_problem,
    create,
    edit_input,
    emulator_options,
    finish,
    iso_after,
    output_image,
    poll,
    scaled,
)

pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin", "pytester"]


# --- requests and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"prompt": "x"}, "input_image"),
        ({"input_image": IMAGE}, "prompt"),
        (edit_input(aspect_ratio="2:1"), "aspect_ratio"),
        (edit_input(num_inference_steps=99), "num_inference_steps"),
        (edit_input(output_format="gif"), "output_format"),
        (edit_input(strength=0.5), "strength"),
        (edit_input(input_image="/tmp/cat.png"), "input_image"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    kontext_emulator: FluxKontextEmulator, http: requests.Session, inputs: dict[str, Any], field: str
) -> None:
    response = http.post(f"{kontext_emulator.base_url}{DEV}", json={"input": inputs})
    body = assert_problem(response, 422)
    assert field in body["detail"]
    assert [f["field"] for f in body["invalid_fields"]] == [field]
    assert kontext_emulator.created_count == 0


def test_bad_bodies(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    base = kontext_emulator.base_url
    assert_problem(http.post(f"{base}{DEV}", data=b"{not json"), 400)
    assert "input" in assert_problem(http.post(f"{base}{DEV}", json={}), 422)["detail"]
    assert_problem(http.post(f"{base}/v1/models/someone/else/predictions", json={"input": edit_input()}), 404)
    assert_problem(http.get(f"{base}/v1/predictions/doesnotexist"), 404)
    assert_problem(http.get(f"{base}/v1/nothing-here"), 404)
    assert_problem(http.post(f"{base}/v1/files", data={"filename": "x"}), 422)


def test_create_by_version(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    base = kontext_emulator.base_url
    for version, expected_version in [
        ("black-forest-labs/flux-kontext-pro:abc123", "abc123"),
        ("f" * 64, "f" * 64),
    ]:
        response = http.post(f"{base}/v1/predictions", json={"version": version, "input": edit_input()})
        assert response.status_code == 201, response.text
        assert response.json()["version"] == expected_version
    models = [p.model for p in kontext_emulator.predictions.values()]
    assert sorted(models) == ["black-forest-labs/flux-kontext-dev", "black-forest-labs/flux-kontext-pro"]
    # pro validates with its own schema: no steps there
    response = http.post(
        f"{base}/v1/predictions",
        json={"version": "black-forest-labs/flux-kontext-pro:x", "input": edit_input(num_inference_steps=20)},
    )
    assert "num_inference_steps" in assert_problem(response, 422)["detail"]


def test_pro_model_without_image_generates_one(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    url = f"{kontext_emulator.base_url}/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    response = http.post(url, json={"input": {"prompt": "a lighthouse", "aspect_ratio": "2:1"}})
    image, _ = output_image(http, poll(http, response.json()["urls"]["get"])[-1])
    assert image.format == "PNG"
    assert image.size == scaled((1456, 720))


def test_account_and_list(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    base = kontext_emulator.base_url
    assert http.get(f"{base}/v1/account").json() == {
        "type": "user",
        "username": "emulator",
        "name": "Kontext Emulator",
    }
    ids = [create(http, kontext_emulator).json()["id"] for _ in range(2)]
    listed = http.get(f"{base}/v1/predictions").json()
    assert [p["id"] for p in listed["results"]] == ids[::-1]
    assert listed["next"] is None
    page = http.get(f"{base}/p/{ids[0]}")
    assert page.status_code == 200
    assert ids[0] in page.text


@emulator_options(token="s3cret")
def test_token_required(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    base = kontext_emulator.base_url
    body = assert_problem(http.get(f"{base}/v1/account"), 401)
    assert body["title"] == "Unauthenticated"
    assert_problem(http.get(f"{base}/v1/account", headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(http.post(f"{base}{DEV}", json={"input": edit_input()}), 401)
    assert kontext_emulator.created_count == 0
    auth = {"Authorization": "Bearer s3cret"}
    assert http.get(f"{base}/v1/account", headers=auth).status_code == 200
    prediction = create(http, kontext_emulator, headers={**auth, "Prefer": "wait"}).json()
    assert prediction["status"] == "succeeded"
    assert http.get(prediction["output"]).status_code == 200  # file URLs need no token
    assert [r.status for r in kontext_emulator.requests] == [401, 401, 401, 200, 201, 200]


@emulator_options(path_prefix="/replicate/")
def test_path_prefix(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    assert emu.base_url == f"http://127.0.0.1:{emu.port}/replicate"
    assert_problem(http.get(f"http://127.0.0.1:{emu.port}/v1/account"), 404)
    prediction = finish(http, emu)
    assert prediction["urls"]["get"].startswith(f"{emu.base_url}/v1/predictions/")
    assert prediction["output"].startswith(f"{emu.base_url}/files/")
    assert http.get(f"{emu.base_url}/_emulator/state").json()["config"]["path_prefix"] == "/replicate"
    assert emu.requests[0] == RequestRecord("GET", "/v1/account", 404)


# --- sync mode, deadlines, cancel, retention ------------------------------------------------------


def test_prefer_wait_returns_the_finished_prediction(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    started = time.monotonic()
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait"}).json()
    assert prediction["status"] == "succeeded"
    assert isinstance(prediction["output"], str)
    assert time.monotonic() - started < 2


@emulator_options(prediction_seconds=5.0)
def test_prefer_wait_n_gives_up_after_n_seconds(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    started = time.monotonic()
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait=1"}).json()
    assert 0.9 < time.monotonic() - started < 2
    assert prediction["status"] == "starting"  # as Replicate answers a wait that ran out
    assert "started_at" not in prediction
    assert http.get(prediction["urls"]["get"]).json()["status"] == "processing"
    assert_problem(create(http, kontext_emulator, headers={"Prefer": "wait=soon"}), 400)


@emulator_options(start_seconds=30.0)
def test_cancel_after_before_start_aborts(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    response = create(http, kontext_emulator, headers={"Cancel-After": "5s"})
    created = response.json()
    assert created["deadline"] == iso_after(created["created_at"], 5)
    kontext_emulator.clock.advance(5.5)  # no sleeping through the 5 s minimum
    final = poll(http, created["urls"]["get"])[-1]
    assert final["status"] == "aborted"
    assert "started_at" not in final  # not nullable in the OpenAPI description: left out
    assert final["completed_at"] == created["deadline"]
    assert final["logs"] == ""


@emulator_options(start_seconds=0.02, prediction_seconds=60.0)
def test_cancel_after_while_running_cancels(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    response = create(http, kontext_emulator, headers={"Cancel-After": "6"})
    kontext_emulator.clock.advance(6.5)
    final = poll(http, response.json()["urls"]["get"])[-1]
    assert final["status"] == "canceled"
    assert final["started_at"] is not None
    assert final["metrics"]["total_time"] == pytest.approx(6.0)
    assert "Using seed" in final["logs"]
    assert "28/28" not in final["logs"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("5m", 300), ("1h30m", 5400), ("120", 120), ("5000ms", 5), (" 2M ", 120), ("", None)],
)
def test_cancel_after_parsing(value: str, seconds: float | None) -> None:
    assert parse_cancel_after(value) == seconds


def test_cancel_after_formats(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    """Check every duration form Replicate documents, at or above its 5 s minimum.

    Every duration form Replicate documents, at or above its 5 s minimum (predictions here take
    0.1 s, so none comes near its deadline: no race with a busy machine).
    """
    values = {"90s": 90, "5m": 300, "1h30m": 5400, "120": 120, "5000ms": 5, "1h30m45s": 5445}
    for value, seconds in values.items():
        created = create(http, kontext_emulator, headers={"Cancel-After": value}).json()
        assert created["deadline"] == iso_after(created["created_at"], seconds), value
        assert poll(http, created["urls"]["get"], timeout=60)[-1]["status"] == "succeeded", value
    for bad in ("soon", "4s", "250ms", "4999ms"):
        assert_problem(create(http, kontext_emulator, headers={"Cancel-After": bad}), 400)
    assert kontext_emulator.created_count == len(values)


@emulator_options(prediction_seconds=2.0)
def test_cancel_endpoint(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    created = create(http, kontext_emulator).json()
    time.sleep(0.2)
    canceled = http.post(created["urls"]["cancel"])
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    time.sleep(0.05)
    assert http.get(created["urls"]["get"]).json()["status"] == "canceled"
    assert_problem(http.post(f"{kontext_emulator.base_url}/v1/predictions/nope/cancel"), 404)


def test_cancel_after_success_changes_nothing(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait"}).json()
    assert http.post(prediction["urls"]["cancel"]).json()["status"] == "succeeded"


def test_retention_removes_input_output_and_logs(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait"}).json()
    assert http.get(prediction["output"]).status_code == 200
    assert prediction["input"]
    assert prediction["logs"]
    kontext_emulator.clock.advance(3600.5)  # Replicate keeps them about an hour
    assert_problem(http.get(prediction["output"]), 404)
    later = http.get(prediction["urls"]["get"]).json()
    assert later["status"] == "succeeded"
    assert later["output"] is None
    assert later["input"] == {}
    assert later["logs"] == ""
    assert later["data_removed"] is True
