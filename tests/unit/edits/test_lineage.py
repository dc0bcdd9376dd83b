"""Test OpenLineage for an edit: dataset names, the run facet, the operator's facets on complete.

OpenLineage for an edit: dataset names from image locations, the run facet, the operator's
``get_openlineage_facets_on_complete``, and that nothing needs the OpenLineage provider.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import datetime, timezone
from unittest import mock

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_kontext.edits.events import prediction_event
from airflow_provider_kontext.edits.lineage import (
    RUN_FACET_KEY,
    dataset_identity,
    edit_lineage,
    public_location,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

PID = "lineage0prediction0id"
HOST = socket.gethostname()


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("https://images.example.com/a/mug.png", ("https://images.example.com", "/a/mug.png")),
        ("HTTPS://Images.Example.com:8443/m.png?sig=abc#x", ("https://images.example.com:8443", "/m.png")),
        ("https://user:r8_secret@proxy.example/x.png", ("https://proxy.example", "/x.png")),
        ("s3://bucket/shots/mug.png", ("s3://bucket", "shots/mug.png")),
        ("gs://bucket/mug.png", ("gs://bucket", "mug.png")),
        ("file:///data/in/mug.png", (f"file://{HOST}", "/data/in/mug.png")),
        ("file://worker-3/data/mug.png", ("file://worker-3", "/data/mug.png")),
        ("/data/in/mug.png", (f"file://{HOST}", "/data/in/mug.png")),
        (ObjectStoragePath("s3://bucket/k/mug.png"), ("s3://bucket", "k/mug.png")),
        ("data:image/png;base64,iVBORw0KGgo=", None),
        (b"\x89PNG", None),
        (None, None),
        ("", None),
        ("https:///no-host.png", None),
        ("http://[::1/broken", None),
    ],
)
def test_dataset_identity(location: object, expected: tuple[str, str] | None) -> None:
    assert dataset_identity(location) == expected


def test_public_location_drops_secrets_and_reads_back() -> None:
    url = "https://user:r8_secret@proxy.example/x.png?X-Amz-Signature=abc"
    location = public_location(url)
    assert location == "https://proxy.example/x.png"
    assert dataset_identity(location) == dataset_identity(url)
    assert public_location("s3://bucket/k.png") == "s3://bucket/k.png"
    assert public_location("data:image/png;base64,AAAA") is None


def summary(outputs: list[str]) -> dict[str, object]:
    prediction = Prediction.model_validate(
        {
            "id": PID,
            "model": "black-forest-labs/flux-kontext-dev",
            "status": "succeeded",
            "output": outputs,
            "created_at": "2025-05-01T10:00:00+00:00",
            "completed_at": "2025-05-01T10:00:06+00:00",
            "metrics": {"predict_time": 4.2},
            "urls": {"web": f"https://replicate.com/p/{PID}"},
        }
    )
    return prediction_event(prediction).summary(outputs)


def test_edit_lineage_datasets_and_run_facet() -> None:
    outputs = ["file:///out/a.png", "file:///out/a.png", "s3://edits/b.png", "data:image/png;base64,AA"]
    lineage = edit_lineage("https://images.example.com/mug.png", summary(outputs))
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("https://images.example.com", "/mug.png")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        (f"file://{HOST}", "/out/a.png"),  # once, however often listed
        ("s3://edits", "b.png"),
    ]  # the data: output is no dataset
    facet = lineage.run_facets[RUN_FACET_KEY]
    assert facet.predictionId == PID
    assert facet.model == "black-forest-labs/flux-kontext-dev"
    assert facet.predictTime == 4.2
    assert facet.status == "succeeded"
    assert facet.webUrl == f"https://replicate.com/p/{PID}"


def test_facet_serializes_as_openlineage_json() -> None:
    from openlineage.client.serde import Serde

    lineage = edit_lineage(None, summary(["https://replicate.delivery/o.png"]))
    document = json.loads(Serde.to_json(lineage.run_facets[RUN_FACET_KEY]))
    assert document["predictionId"] == PID
    assert document["predictTime"] == 4.2
    assert document["_producer"]
    assert document["_schemaURL"]
    assert lineage.inputs == []


def test_no_completed_edit_no_lineage() -> None:
    assert edit_lineage("https://x/y.png", None) is None


def test_without_the_openlineage_provider_lineage_is_none() -> None:
    with mock.patch.dict(sys.modules, {"airflow.providers.openlineage.extractors": None}):
        assert edit_lineage("https://x/y.png", summary(["https://x/o.png"])) is None


def test_operator_reports_its_input_and_outputs() -> None:
    hook = mock.create_autospec(FluxKontextHook, instance=True)
    hook.redact.side_effect = lambda text: text
    op = FluxKontextEditOperator(task_id="edit", prompt="p", input_image="s3://shots/mug.png")
    assert op.get_openlineage_facets_on_complete(mock.Mock()) is None  # nothing completed yet
    done = Prediction.model_validate(
        {
            "id": PID,
            "status": "succeeded",
            "output": "https://replicate.delivery/o.png",
            "created_at": datetime.now(timezone.utc).isoformat(),
            "metrics": {"predict_time": 1.5},
        }
    )
    with mock.patch.object(FluxKontextEditOperator, "hook", hook):
        op.execute_complete({"ti": mock.MagicMock()}, prediction_event(done).payload())
    lineage = op.get_openlineage_facets_on_complete(mock.Mock())
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://shots", "mug.png")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("https://replicate.delivery", "/o.png")]
    assert lineage.run_facets[RUN_FACET_KEY].predictTime == 1.5


def test_importing_the_operator_and_sensor_does_not_import_openlineage() -> None:
    code = (
        "import sys\n"
        "import airflow_provider_kontext.operators.kontext, airflow_provider_kontext.sensors.kontext\n"
        "ours = ('openlineage', 'airflow.providers.openlineage.')\n"
        "print(sorted(m for m in sys.modules if m.startswith(ours) and not m.endswith('provider_info')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
