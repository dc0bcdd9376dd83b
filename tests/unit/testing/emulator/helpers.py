"""Build the emulator tests' requests, images and polls against an emulator on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from PIL import Image

from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.testing import FluxKontextEmulator

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


def emulator_options(**options: Any) -> pytest.MarkDecorator:
    """Run the test against an emulator with these options on top of ``FAST``.

    (Users of the plugin can use ``@pytest.mark.kontext_emulator(...)``; here the plugin is only
    registered after this module is imported, too late for pytest to know the marker.)
    """
    return pytest.mark.parametrize("kontext_emulator_options", [options], indirect=True, ids=["options"])


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
    http: requests.Session, emu: FluxKontextEmulator, headers: dict[str, str] | None = None, **inputs: Any
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


def finish(http: requests.Session, emu: FluxKontextEmulator, **inputs: Any) -> dict[str, Any]:
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
