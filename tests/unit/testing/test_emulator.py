"""The Kontext emulator over real HTTP on 127.0.0.1: lifecycle, inputs, images, errors and faults.

Every request goes to an emulator started for the test (the ``kontext_emulator`` fixture, or one
started here); clients ignore proxy settings from the environment, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import requests
from PIL import Image

from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.testing import KontextEmulator
from airflow_provider_kontext.testing.faults import CREATE, NSFW_ERROR, PREDICTION
from airflow_provider_kontext.testing.service import RequestRecord, parse_cancel_after

pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin", "pytester"]

DEV = "/v1/models/black-forest-labs/flux-kontext-dev/predictions"
SCALE = 0.1
FAST = {"prediction_seconds": 0.1, "start_seconds": 0.02, "output_scale": SCALE}

#: Kontext's output size of each aspect ratio at full scale (the real model's, see the reference).
SIZES = {
    "1:1": (1024, 1024),
    "16:9": (1328, 800),
    "9:16": (800, 1328),
    "21:9": (1568, 672),
    "9:21": (672, 1568),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "4:3": (1184, 880),
    "3:4": (880, 1184),
    "5:4": (1104, 944),
    "4:5": (944, 1104),
}


@pytest.fixture
def kontext_emulator_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Fast defaults for every test here, plus what :func:`emulator_options` asks for."""
    return {**FAST, **getattr(request, "param", {})}


def emulator_options(**options: Any) -> pytest.MarkDecorator:
    """Run the test against an emulator with these options on top of ``FAST``.

    (Users of the plugin can use ``@pytest.mark.kontext_emulator(...)``; here the plugin is only
    registered after this module is imported, too late for pytest to know the marker.)
    """
    return pytest.mark.parametrize("kontext_emulator_options", [options], indirect=True, ids=["options"])


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # no proxy from the environment: straight to 127.0.0.1
        yield session


def png_bytes(size: tuple[int, int] = (640, 480), colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


IMAGE = data_uri(png_bytes())


def edit_input(**overrides: Any) -> dict[str, Any]:
    return {"prompt": "make the background blue", "input_image": IMAGE, "seed": 42, **overrides}


def create(
    http: requests.Session, emu: KontextEmulator, headers: dict[str, str] | None = None, **inputs: Any
) -> requests.Response:
    return http.post(f"{emu.base_url}{DEV}", json={"input": edit_input(**inputs)}, headers=headers or {})


def poll(http: requests.Session, url: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every state seen while polling ``url`` until the prediction is terminal."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prediction = http.get(url).json()
        seen.append(prediction)
        if Prediction.model_validate(prediction).is_terminal:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"not terminal after {timeout}s: {seen[-1]['status']}")


def finish(http: requests.Session, emu: KontextEmulator, **inputs: Any) -> dict[str, Any]:
    response = create(http, emu, **inputs)
    assert response.status_code == 201, response.text
    return poll(http, response.json()["urls"]["get"])[-1]


def output_image(http: requests.Session, prediction: dict[str, Any]) -> tuple[Image.Image, bytes]:
    assert isinstance(prediction["output"], str), prediction
    response = http.get(prediction["output"])
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content)), response.content


def iso_after(created_at: str, seconds: float) -> str:
    """``created_at`` plus ``seconds``, in the emulator's ISO 8601 form."""
    moment = datetime.fromisoformat(created_at.replace("Z", "+00:00")) + timedelta(seconds=seconds)
    return moment.isoformat().replace("+00:00", "Z")


def scaled(size: tuple[int, int], scale: float = SCALE) -> tuple[int, int]:
    return round(size[0] * scale), round(size[1] * scale)


def assert_problem(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return body


# --- lifecycle and outputs ----------------------------------------------------------------------


# Generous on purpose: 1.5 s of processing gives a poll every 20 ms many looks at the growing logs
# even when a loaded machine answers each poll in a few hundred ms (0.2 s did not).
@emulator_options(prediction_seconds=1.5, start_seconds=0.1)
def test_lifecycle_reaches_succeeded_with_growing_logs(
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    emu = kontext_emulator
    response = create(http, emu)
    assert response.status_code == 201
    created = response.json()
    assert created["status"] == "starting"
    assert created["output"] is None
    assert created["model"] == "black-forest-labs/flux-kontext-dev"
    assert created["input"] == edit_input()
    assert created["urls"]["get"] == f"{emu.base_url}/v1/predictions/{created['id']}"
    assert created["urls"]["cancel"].endswith("/cancel")
    assert created["id"].isalnum()

    seen = poll(http, created["urls"]["get"], timeout=60)
    statuses = [p["status"] for p in seen]
    assert statuses[-1] == "succeeded"
    assert "processing" in statuses
    assert statuses.index("processing") < statuses.index("succeeded")
    logs = [p["logs"] for p in seen if p["status"] != "starting"]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(logs))
    assert len(set(logs)) > 2, "logs should grow while processing"

    final = seen[-1]
    assert final["logs"].startswith("Using seed: 42\n")
    assert "28/28" in final["logs"]
    assert "100%|██████████|" in final["logs"]
    assert final["error"] is None
    assert final["data_removed"] is False
    assert final["metrics"]["predict_time"] == pytest.approx(1.5)
    assert final["metrics"]["total_time"] == pytest.approx(1.6)
    parsed = Prediction.model_validate(final)
    assert parsed.created_at < parsed.started_at < parsed.completed_at  # type: ignore[operator]
    assert parsed.output_urls == [final["output"]]

    image, _ = output_image(http, final)
    assert image.format == "WEBP"
    assert image.size == scaled((1184, 880))  # 640x480 snaps to the nearest preset, 1184x880
    assert emu.created_count == 1
    assert emu.prediction(created["id"]).status.value == "succeeded"
    assert set(emu.predictions) == {created["id"]}


def test_each_aspect_ratio_has_kontext_size(
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    emu = kontext_emulator
    urls = {ratio: create(http, emu, aspect_ratio=ratio).json()["urls"]["get"] for ratio in SIZES}
    tall = create(http, emu, input_image=data_uri(png_bytes((300, 700)))).json()["urls"]["get"]
    for ratio, url in urls.items():
        image, _ = output_image(http, poll(http, url)[-1])
        assert image.size == scaled(SIZES[ratio]), ratio
    image, _ = output_image(http, poll(http, tall)[-1])
    assert image.size == scaled((672, 1568))  # match_input_image: the preset nearest 3:7


@emulator_options(output_scale=1.0)
def test_full_scale_sizes(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    for ratio in ("1:1", "16:9"):
        image, _ = output_image(http, finish(http, kontext_emulator, aspect_ratio=ratio))
        assert image.size == SIZES[ratio]


@pytest.mark.parametrize(
    ("output_format", "pillow_format"), [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")]
)
def test_output_formats(
    kontext_emulator: KontextEmulator, http: requests.Session, output_format: str, pillow_format: str
) -> None:
    prediction = finish(http, kontext_emulator, output_format=output_format, output_quality=50)
    assert prediction["output"].endswith(f"/output.{output_format}")
    image, _ = output_image(http, prediction)
    assert image.format == pillow_format


def test_output_is_deterministic(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    first = [create(http, emu).json()["urls"]["get"] for _ in range(2)]
    other_seed = create(http, emu, seed=7).json()["urls"]["get"]
    other_prompt = create(http, emu, prompt="make it snow").json()["urls"]["get"]
    a, b, c, d = (output_image(http, poll(http, url)[-1])[1] for url in [*first, other_seed, other_prompt])
    assert a == b
    assert a != c
    assert a != d


def test_edit_changes_the_image(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    image, _ = output_image(http, finish(http, kontext_emulator, output_format="png"))
    middle = image.convert("RGB").getpixel((image.width // 2, image.height // 3))
    assert middle != (200, 40, 40), "the prompt's tint should change the colour"


def test_random_seed_when_unset_or_zero(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    for seed in (None, 0):
        inputs = edit_input(seed=seed) if seed is not None else {"prompt": "x", "input_image": IMAGE}
        response = http.post(f"{kontext_emulator.base_url}{DEV}", json={"input": inputs})
        prediction = poll(http, response.json()["urls"]["get"])[-1]
        assert prediction["logs"].startswith("Using seed: ")
        assert prediction["status"] == "succeeded"


# --- input images -------------------------------------------------------------------------------


def test_uploaded_file_as_input(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    content = png_bytes((200, 200))
    response = http.post(f"{emu.base_url}/v1/files", files={"content": ("photo.png", content, "image/png")})
    assert response.status_code == 201
    uploaded = response.json()
    assert uploaded["size"] == len(content)
    assert uploaded["name"] == "photo.png"
    assert uploaded["content_type"] == "image/png"
    assert {"sha256", "md5"} <= uploaded["checksums"].keys()
    assert uploaded["expires_at"] > uploaded["created_at"]
    assert http.get(uploaded["urls"]["get"]).json() == uploaded  # the file's metadata, as Replicate
    assert http.get(emu.file_download_url(uploaded["id"])).content == content
    image, _ = output_image(http, finish(http, emu, input_image=uploaded["urls"]["get"]))
    assert image.size == scaled((1024, 1024))


def test_output_of_one_prediction_as_input_of_another(
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    first = finish(http, kontext_emulator, aspect_ratio="16:9")
    second = finish(http, kontext_emulator, input_image=first["output"], prompt="now add a hat")
    assert second["status"] == "succeeded"


def test_input_from_another_local_server(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    with KontextEmulator() as other:
        uploaded = http.post(
            f"{other.base_url}/v1/files", files={"content": ("a.png", png_bytes((100, 300)), "image/png")}
        ).json()
        url = other.file_download_url(uploaded["id"])  # the bytes, not the file's JSON
        prediction = finish(http, kontext_emulator, input_image=url)
        assert other.requests[-1] == RequestRecord("GET", f"/v1/files/{uploaded['id']}/download", 200)
    image, _ = output_image(http, prediction)
    assert image.size == scaled((672, 1568))


@pytest.mark.parametrize(
    ("input_image", "message"),
    [
        ("https://example.com/cat.png", "offline"),
        (data_uri(b"%PDF-1.4 not an image", "image/png"), "must be a jpeg, png, gif or webp"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_unusable_input_image_fails_the_prediction(
    kontext_emulator: KontextEmulator, http: requests.Session, input_image: str, message: str
) -> None:
    prediction = finish(http, kontext_emulator, input_image=input_image)
    assert prediction["status"] == "failed"
    assert message in prediction["error"]
    assert prediction["output"] is None


def test_bmp_is_refused(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="BMP")
    # labelled png, so only the bytes can give it away
    prediction = finish(http, kontext_emulator, input_image=data_uri(buffer.getvalue(), "image/png"))
    assert prediction["status"] == "failed"
    assert "a BMP image" in prediction["error"]


def test_gif_and_transparent_webp_inputs(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    for pillow_format, mode in (("GIF", "P"), ("WEBP", "RGBA")):
        buffer = io.BytesIO()
        Image.new(mode, (64, 48)).save(buffer, format=pillow_format)
        uri = data_uri(buffer.getvalue(), f"image/{pillow_format.lower()}")
        assert finish(http, kontext_emulator, input_image=uri)["status"] == "succeeded"


# --- requests and errors ------------------------------------------------------------------------


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
    kontext_emulator: KontextEmulator, http: requests.Session, inputs: dict[str, Any], field: str
) -> None:
    response = http.post(f"{kontext_emulator.base_url}{DEV}", json={"input": inputs})
    body = assert_problem(response, 422)
    assert field in body["detail"]
    assert [f["field"] for f in body["invalid_fields"]] == [field]
    assert kontext_emulator.created_count == 0


def test_bad_bodies(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    base = kontext_emulator.base_url
    assert_problem(http.post(f"{base}{DEV}", data=b"{not json"), 400)
    assert "input" in assert_problem(http.post(f"{base}{DEV}", json={}), 422)["detail"]
    assert_problem(http.post(f"{base}/v1/models/someone/else/predictions", json={"input": edit_input()}), 404)
    assert_problem(http.get(f"{base}/v1/predictions/doesnotexist"), 404)
    assert_problem(http.get(f"{base}/v1/nothing-here"), 404)
    assert_problem(http.post(f"{base}/v1/files", data={"filename": "x"}), 422)


def test_create_by_version(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    url = f"{kontext_emulator.base_url}/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    response = http.post(url, json={"input": {"prompt": "a lighthouse", "aspect_ratio": "2:1"}})
    image, _ = output_image(http, poll(http, response.json()["urls"]["get"])[-1])
    assert image.format == "PNG"
    assert image.size == scaled((1456, 720))


def test_account_and_list(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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
def test_token_required(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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
def test_path_prefix(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    assert emu.base_url == f"http://127.0.0.1:{emu.port}/replicate"
    assert_problem(http.get(f"http://127.0.0.1:{emu.port}/v1/account"), 404)
    prediction = finish(http, emu)
    assert prediction["urls"]["get"].startswith(f"{emu.base_url}/v1/predictions/")
    assert prediction["output"].startswith(f"{emu.base_url}/files/")
    assert http.get(f"{emu.base_url}/_emulator/state").json()["config"]["path_prefix"] == "/replicate"
    assert emu.requests[0] == RequestRecord("GET", "/v1/account", 404)


# --- sync mode, deadlines, cancel, retention ----------------------------------------------------


def test_prefer_wait_returns_the_finished_prediction(
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    started = time.monotonic()
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait"}).json()
    assert prediction["status"] == "succeeded"
    assert isinstance(prediction["output"], str)
    assert time.monotonic() - started < 2


@emulator_options(prediction_seconds=5.0)
def test_prefer_wait_n_gives_up_after_n_seconds(
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    started = time.monotonic()
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait=1"}).json()
    assert 0.9 < time.monotonic() - started < 2
    assert prediction["status"] == "starting"  # as Replicate answers a wait that ran out
    assert "started_at" not in prediction
    assert http.get(prediction["urls"]["get"]).json()["status"] == "processing"
    assert_problem(create(http, kontext_emulator, headers={"Prefer": "wait=soon"}), 400)


@emulator_options(start_seconds=30.0)
def test_cancel_after_before_start_aborts(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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
    kontext_emulator: KontextEmulator, http: requests.Session
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


def test_cancel_after_formats(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    """Every duration form Replicate documents, at or above its 5 s minimum (predictions here take
    0.1 s, so none comes near its deadline: no race with a busy machine)."""
    values = {"90s": 90, "5m": 300, "1h30m": 5400, "120": 120, "5000ms": 5, "1h30m45s": 5445}
    for value, seconds in values.items():
        created = create(http, kontext_emulator, headers={"Cancel-After": value}).json()
        assert created["deadline"] == iso_after(created["created_at"], seconds), value
        assert poll(http, created["urls"]["get"], timeout=60)[-1]["status"] == "succeeded", value
    for bad in ("soon", "4s", "250ms", "4999ms"):
        assert_problem(create(http, kontext_emulator, headers={"Cancel-After": bad}), 400)
    assert kontext_emulator.created_count == len(values)


@emulator_options(prediction_seconds=2.0)
def test_cancel_endpoint(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    created = create(http, kontext_emulator).json()
    time.sleep(0.2)
    canceled = http.post(created["urls"]["cancel"])
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    time.sleep(0.05)
    assert http.get(created["urls"]["get"]).json()["status"] == "canceled"
    assert_problem(http.post(f"{kontext_emulator.base_url}/v1/predictions/nope/cancel"), 404)


def test_cancel_after_success_changes_nothing(
    kontext_emulator: KontextEmulator, http: requests.Session
) -> None:
    prediction = create(http, kontext_emulator, headers={"Prefer": "wait"}).json()
    assert http.post(prediction["urls"]["cancel"]).json()["status"] == "succeeded"


def test_retention_removes_input_output_and_logs(
    kontext_emulator: KontextEmulator, http: requests.Session
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


# --- faults -------------------------------------------------------------------------------------


def test_throttle_with_and_without_retry_after(
    kontext_emulator: KontextEmulator, http: requests.Session
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
        with KontextEmulator(fault_seed=seed, **FAST) as emu:  # type: ignore[arg-type]
            emu.faults.throttle(probability=0.5, path="/v1/account")
            return [http.get(f"{emu.base_url}/v1/account").status_code for _ in range(40)]

    first = statuses(3)
    assert first == statuses(3)
    assert 5 < first.count(429) < 35


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors(kontext_emulator: KontextEmulator, http: requests.Session, status: int) -> None:
    emu = kontext_emulator
    emu.faults.server_error(2, status=status, method="GET", path=PREDICTION)
    url = create(http, emu).json()["urls"]["get"]
    assert_problem(http.get(url), status)
    assert_problem(http.get(url), status)
    assert http.get(url).status_code == 200


def test_server_error_as_proxy_html_page(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    kontext_emulator.faults.server_error(status=502, html=True)
    response = http.get(f"{kontext_emulator.base_url}/v1/account")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>502 Bad Gateway</title>" in response.text


def test_drop_connection_before_processing(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    emu.faults.drop_connection(1, method="POST", path=CREATE)
    with pytest.raises(requests.ConnectionError):
        create(http, emu)
    assert emu.created_count == 0
    assert create(http, emu).status_code == 201
    assert emu.requests[0] == RequestRecord("POST", DEV, None)


def test_drop_connection_after_processing(kontext_emulator: KontextEmulator) -> None:
    emu = kontext_emulator
    emu.faults.drop_connection(1, method="POST", path=CREATE, after_processing=True)
    with httpx.Client(trust_env=False) as client, pytest.raises(httpx.TransportError):
        client.post(f"{emu.base_url}{DEV}", json={"input": edit_input()})
    assert emu.created_count == 1  # created, but the client never heard
    (record,) = emu.predictions.values()
    assert record.input["prompt"] == "make the background blue"


def test_slow_responses(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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
    kontext_emulator: KontextEmulator, http: requests.Session, arm: dict[str, Any], status: str, error: str
) -> None:
    kontext_emulator.faults.fail_predictions(1, **arm)
    failed = finish(http, kontext_emulator)
    assert failed["status"] == status
    assert error in failed["error"]
    assert failed["output"] is None
    assert finish(http, kontext_emulator)["status"] == "succeeded"


def test_forced_cancel_and_abort(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
    kontext_emulator.faults.cancel_predictions(1)
    kontext_emulator.faults.abort_predictions(1)
    canceled, aborted = finish(http, kontext_emulator), finish(http, kontext_emulator)
    assert canceled["status"] == "canceled"
    assert canceled["started_at"] is not None
    assert aborted["status"] == "aborted"
    assert "started_at" not in aborted  # not nullable in the OpenAPI description: left out


def test_images_api_shape(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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


def test_http_control_endpoints(kontext_emulator: KontextEmulator, http: requests.Session) -> None:
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


# --- packaging ----------------------------------------------------------------------------------


def test_package_import_is_cheap() -> None:
    code = (
        "import sys, airflow_provider_kontext.testing as t; "
        "heavy = [m for m in ('fastapi', 'uvicorn', 'PIL', 'starlette') if m in sys.modules]; "
        "assert not heavy, heavy; assert t.KontextEmulator.__name__ == 'KontextEmulator'"
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
