"""The official ``replicate`` client (1.0.x) driving its main calls against the emulator.

What a user's own tests do when they point ``replicate`` at the emulator: ``run`` (a data URI, a
file object, a ``wait`` shorter than the prediction, ``owner/name:version``), predictions
create/get/wait/reload/cancel/list/paginate and stream, ``models.get``, files create/get/list/delete,
the webhook secret, and the async variants. Every response the client sees is also checked against
Replicate's OpenAPI description.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from emulated import data_uri, options, png, started
from openapi_contract import Contract
from PIL import Image

from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.model_catalog import MODEL_VERSIONS

replicate = pytest.importorskip("replicate")
from replicate.exceptions import ReplicateError  # noqa: E402
from replicate.pagination import async_paginate, paginate  # noqa: E402

DEV_MODEL = "black-forest-labs/flux-kontext-dev"
TOKEN = "r8_client"
POLL = 0.05


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[FluxKontextEmulator]:
    with started(request, prediction_seconds=0.3, start_seconds=0.05, token=TOKEN) as emulator:
        yield emulator


@pytest.fixture
def contract(emu: FluxKontextEmulator) -> Contract:
    return Contract(emu.base_url)


@pytest.fixture
def client(emu: FluxKontextEmulator, contract: Contract) -> Iterator[Any]:
    client = replicate.Client(
        api_token=TOKEN,
        base_url=emu.base_url,
        trust_env=False,
        event_hooks={"response": [contract.httpx_hook()]},
    )
    client.poll_interval = POLL
    yield client
    client._client.close()


@pytest.fixture
async def aclient(emu: FluxKontextEmulator, contract: Contract) -> AsyncIterator[Any]:
    client = replicate.Client(
        api_token=TOKEN,
        base_url=emu.base_url,
        trust_env=False,
        event_hooks={"response": [contract.async_httpx_hook()]},
    )
    client.poll_interval = POLL
    yield client
    await client._async_client.aclose()


def assert_image(output: Any, size: tuple[int, int]) -> None:
    """Check that ``run`` returns the emulator's http://127.0.0.1 output URL itself.

    The client wraps only https: and data: outputs in ``FileOutput``; the emulator's are
    http://127.0.0.1 URLs, so ``run`` returns the URL itself.
    """
    assert isinstance(output, str)
    with httpx.Client(trust_env=False) as http:
        image = Image.open(io.BytesIO(http.get(output).content))
    assert image.size == size


# --- run ----------------------------------------------------------------------------------------


def test_run_with_a_data_uri(client: Any, contract: Contract) -> None:
    output = client.run(DEV_MODEL, input={"prompt": "make it blue", "input_image": data_uri(png())})
    assert_image(output, (62, 42))  # 96x64 (3:2) snaps to 1248x832, at scale 0.05
    assert ("POST", 201) in contract.operations()


def test_run_with_a_file_object(client: Any, emu: FluxKontextEmulator, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png((64, 64)))
    with path.open("rb") as handle:
        output = client.run(DEV_MODEL, input={"prompt": "add a hat", "input_image": handle})
    assert_image(output, (51, 51))
    (record,) = emu.predictions.values()
    assert record.input["input_image"].startswith(f"{emu.base_url}/v1/files/")  # uploaded first


@options(prediction_seconds=2.5)
def test_run_with_a_wait_shorter_than_the_prediction(client: Any, emu: FluxKontextEmulator) -> None:
    """Check that the client keeps waiting after ``Prefer: wait=1`` runs out and returns the output.

    ``Prefer: wait=1`` runs out; the emulator answers ``starting`` like Replicate, so the
    client keeps waiting and returns the output (it returned ``None`` against 'processing').
    """
    output = client.run(DEV_MODEL, input={"prompt": "x", "input_image": data_uri(png())}, wait=1)
    assert_image(output, (62, 42))
    assert emu.requests[0].path.endswith("/predictions")
    assert any(r.method == "GET" and r.path.startswith("/v1/predictions/") for r in emu.requests)


def test_run_owner_name_version(client: Any, emu: FluxKontextEmulator) -> None:
    ref = f"{DEV_MODEL}:{MODEL_VERSIONS[DEV_MODEL]}"
    output = client.run(ref, input={"prompt": "x", "input_image": data_uri(png())})
    assert_image(output, (62, 42))
    (record,) = emu.predictions.values()
    assert record.version == MODEL_VERSIONS[DEV_MODEL]
    paths = [r.path for r in emu.requests]
    assert f"/v1/models/{DEV_MODEL}/versions/{MODEL_VERSIONS[DEV_MODEL]}" in paths


def test_run_that_fails_raises_model_error(client: Any, emu: FluxKontextEmulator) -> None:
    emu.faults.fail_predictions(1, nsfw=True)
    with pytest.raises(replicate.exceptions.ModelError, match="NSFW"):
        client.run(DEV_MODEL, input={"prompt": "x", "input_image": data_uri(png())})


def test_invalid_input_is_a_replicate_error(client: Any) -> None:
    with pytest.raises(ReplicateError) as raised:
        client.run(DEV_MODEL, input={"prompt": "x", "input_image": data_uri(png()), "aspect_ratio": "2:1"})
    assert raised.value.status == 422
    assert "aspect_ratio" in str(raised.value.detail)


# --- predictions --------------------------------------------------------------------------------


@options(prediction_seconds=1.0)
def test_predictions_create_get_wait_reload_cancel(client: Any) -> None:
    inputs = {"prompt": "x", "input_image": data_uri(png())}
    prediction = client.models.predictions.create(model=DEV_MODEL, input=inputs)
    assert prediction.status == "starting"
    fetched = client.predictions.get(prediction.id)
    assert fetched.id == prediction.id
    prediction.wait()
    assert prediction.status == "succeeded"
    assert prediction.metrics["predict_time"] == pytest.approx(1.0)
    progress = prediction.progress
    assert progress is not None
    assert (progress.current, progress.total) == (28, 28)

    other = client.predictions.create(version=DEV_MODEL, input=inputs)
    other.cancel()
    assert other.status == "canceled"
    other.reload()
    assert other.status == "canceled"


def test_predictions_list_and_paginate(client: Any) -> None:
    inputs = {"prompt": "x", "input_image": data_uri(png((8, 8)))}
    created = [client.predictions.create(version=DEV_MODEL, input=inputs).id for _ in range(103)]
    first = client.predictions.list()
    assert [p.id for p in first.results] == created[::-1][:100]
    assert first.next is not None
    every = [p.id for page in paginate(client.predictions.list) for p in page]
    assert every == created[::-1]


def test_prediction_stream(client: Any) -> None:
    prediction = client.models.predictions.create(
        model=DEV_MODEL, input={"prompt": "x", "input_image": data_uri(png())}
    )
    events = list(prediction.stream())
    kinds = [event.event.value for event in events]
    assert kinds[0] == "logs"
    assert kinds[-2:] == ["output", "done"]
    assert events[-2].data == client.predictions.get(prediction.id).output


# --- models, files, webhooks --------------------------------------------------------------------


def test_models_get(client: Any) -> None:
    model = client.models.get(DEV_MODEL)
    assert (model.owner, model.name) == ("black-forest-labs", "flux-kontext-dev")
    assert model.latest_version.id == MODEL_VERSIONS[DEV_MODEL]
    version = model.versions.get(MODEL_VERSIONS[DEV_MODEL])
    assert version.id == MODEL_VERSIONS[DEV_MODEL]
    assert [v.id for v in model.versions.list()] == [version.id]
    with pytest.raises(ReplicateError) as raised:
        client.models.get("someone/else")
    assert raised.value.status == 404


def test_files_create_get_list_delete(client: Any, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png())
    created = client.files.create(path, metadata={"job": 7})
    assert created.size == path.stat().st_size
    assert created.metadata == {"job": 7}
    assert client.files.get(created.id).checksums == created.checksums
    assert [f.id for f in client.files.list()] == [created.id]
    client.files.delete(created.id)
    assert client.files.list() == []
    with pytest.raises(ReplicateError) as raised:
        client.files.get(created.id)
    assert raised.value.status == 404


def test_webhook_secret(client: Any, emu: FluxKontextEmulator) -> None:
    assert client.webhooks.default.secret().key == emu.webhook_secret


# --- async --------------------------------------------------------------------------------------


@options(prediction_seconds=2.5)
async def test_async_run_data_uri_and_short_wait(aclient: Any) -> None:
    output = await aclient.async_run(DEV_MODEL, input={"prompt": "x", "input_image": data_uri(png())}, wait=1)
    assert_image(output, (62, 42))


async def test_async_run_with_a_file_object(aclient: Any, emu: FluxKontextEmulator, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png((64, 64)))
    with path.open("rb") as handle:
        output = await aclient.async_run(DEV_MODEL, input={"prompt": "x", "input_image": handle})
    assert_image(output, (51, 51))
    (record,) = emu.predictions.values()
    assert record.input["input_image"].startswith(f"{emu.base_url}/v1/files/")


@options(prediction_seconds=1.0)
async def test_async_predictions(aclient: Any) -> None:
    inputs = {"prompt": "x", "input_image": data_uri(png())}
    prediction = await aclient.models.predictions.async_create(model=DEV_MODEL, input=inputs)
    assert (await aclient.predictions.async_get(prediction.id)).id == prediction.id
    await prediction.async_wait()
    assert prediction.status == "succeeded"
    other = await aclient.predictions.async_create(version=DEV_MODEL, input=inputs)
    await other.async_cancel()
    await other.async_reload()
    assert other.status == "canceled"
    listed = [p.id async for page in async_paginate(aclient.predictions.async_list) for p in page]
    assert listed == [other.id, prediction.id]
    events = [event.event.value async for event in prediction.async_stream()]
    assert events[-2:] == ["output", "done"]


async def test_async_models_files_and_secret(aclient: Any, emu: FluxKontextEmulator, tmp_path: Path) -> None:
    model = await aclient.models.async_get(DEV_MODEL)
    assert model.latest_version.id == MODEL_VERSIONS[DEV_MODEL]
    path = tmp_path / "a.png"
    path.write_bytes(png())
    created = await aclient.files.async_create(path)
    assert (await aclient.files.async_get(created.id)).id == created.id
    assert [f.id for f in await aclient.files.async_list()] == [created.id]
    await aclient.files.async_delete(created.id)
    assert await aclient.files.async_list() == []
    assert (await aclient.webhooks.default.async_secret()).key == emu.webhook_secret
