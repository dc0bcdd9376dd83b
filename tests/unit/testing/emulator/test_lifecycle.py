"""Test the Kontext emulator over real HTTP on 127.0.0.1: lifecycle, outputs, input images.

Every request goes to an emulator started for the test (the ``kontext_emulator`` fixture, or one
started here); clients ignore proxy settings from the environment, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import io
import itertools

import pytest
import requests
from PIL import Image

from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.service import RequestRecord

from .helpers import (
    DEV,
    IMAGE,
    SIZES,
    create,
    data_uri,
    edit_input,
    emulator_options,
    finish,
    output_image,
    png_bytes,
    poll,
    scaled,
)

pytest_plugins = ["airflow_provider_kontext.testing.pytest_plugin", "pytester"]


# --- lifecycle and outputs ------------------------------------------------------------------------


# Generous on purpose: 1.5 s of processing gives a poll every 20 ms many looks at the growing logs
# even when a loaded machine answers each poll in a few hundred ms (0.2 s did not).
@emulator_options(prediction_seconds=1.5, start_seconds=0.1)
def test_lifecycle_reaches_succeeded_with_growing_logs(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
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
    kontext_emulator: FluxKontextEmulator, http: requests.Session
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
def test_full_scale_sizes(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    for ratio in ("1:1", "16:9"):
        image, _ = output_image(http, finish(http, kontext_emulator, aspect_ratio=ratio))
        assert image.size == SIZES[ratio]


@pytest.mark.parametrize(
    ("output_format", "pillow_format"), [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")]
)
def test_output_formats(
    kontext_emulator: FluxKontextEmulator, http: requests.Session, output_format: str, pillow_format: str
) -> None:
    prediction = finish(http, kontext_emulator, output_format=output_format, output_quality=50)
    assert prediction["output"].endswith(f"/output.{output_format}")
    image, _ = output_image(http, prediction)
    assert image.format == pillow_format


def test_output_is_deterministic(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    emu = kontext_emulator
    first = [create(http, emu).json()["urls"]["get"] for _ in range(2)]
    other_seed = create(http, emu, seed=7).json()["urls"]["get"]
    other_prompt = create(http, emu, prompt="make it snow").json()["urls"]["get"]
    a, b, c, d = (output_image(http, poll(http, url)[-1])[1] for url in [*first, other_seed, other_prompt])
    assert a == b
    assert a != c
    assert a != d


def test_edit_changes_the_image(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    image, _ = output_image(http, finish(http, kontext_emulator, output_format="png"))
    middle = image.convert("RGB").getpixel((image.width // 2, image.height // 3))
    assert middle != (200, 40, 40), "the prompt's tint should change the colour"


def test_random_seed_when_unset_or_zero(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    for seed in (None, 0):
        inputs = edit_input(seed=seed) if seed is not None else {"prompt": "x", "input_image": IMAGE}
        response = http.post(f"{kontext_emulator.base_url}{DEV}", json={"input": inputs})
        prediction = poll(http, response.json()["urls"]["get"])[-1]
        assert prediction["logs"].startswith("Using seed: ")
        assert prediction["status"] == "succeeded"


# --- input images ---------------------------------------------------------------------------------


def test_uploaded_file_as_input(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
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
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    first = finish(http, kontext_emulator, aspect_ratio="16:9")
    second = finish(http, kontext_emulator, input_image=first["output"], prompt="now add a hat")
    assert second["status"] == "succeeded"


def test_input_from_another_local_server(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    with FluxKontextEmulator() as other:
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
    kontext_emulator: FluxKontextEmulator, http: requests.Session, input_image: str, message: str
) -> None:
    prediction = finish(http, kontext_emulator, input_image=input_image)
    assert prediction["status"] == "failed"
    assert message in prediction["error"]
    assert prediction["output"] is None


def test_bmp_is_refused(kontext_emulator: FluxKontextEmulator, http: requests.Session) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="BMP")
    # labelled png, so only the bytes can give it away
    prediction = finish(http, kontext_emulator, input_image=data_uri(buffer.getvalue(), "image/png"))
    assert prediction["status"] == "failed"
    assert "a BMP image" in prediction["error"]


def test_gif_and_transparent_webp_inputs(
    kontext_emulator: FluxKontextEmulator, http: requests.Session
) -> None:
    for pillow_format, mode in (("GIF", "P"), ("WEBP", "RGBA")):
        buffer = io.BytesIO()
        Image.new(mode, (64, 48)).save(buffer, format=pillow_format)
        uri = data_uri(buffer.getvalue(), f"image/{pillow_format.lower()}")
        assert finish(http, kontext_emulator, input_image=uri)["status"] == "succeeded"
