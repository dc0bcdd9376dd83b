"""Test the prediction model (``Prediction``) and the other response models."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from airflow_provider_kontext.models import (
    TERMINAL_STATUSES,
    Account,
    Prediction,
    PredictionStatus,
    UploadedFile,
)

from .helpers import DEV

# --- Prediction -----------------------------------------------------------------------------------


def prediction(**fields: Any) -> Prediction:
    return Prediction.model_validate({"id": "abc123", "status": "starting", **fields})


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        ("starting", False),
        ("processing", False),
        ("succeeded", True),
        ("failed", True),
        ("canceled", True),
        ("aborted", True),
    ],
)
def test_status_terminal(status: str, terminal: bool) -> None:
    parsed = prediction(status=status)
    assert parsed.status is PredictionStatus(status)
    assert parsed.status.is_terminal is terminal
    assert parsed.is_terminal is terminal


def test_terminal_statuses_include_aborted() -> None:
    assert {s.value for s in TERMINAL_STATUSES} == {"succeeded", "failed", "canceled", "aborted"}
    assert {s.value for s in PredictionStatus} == {
        "starting",
        "processing",
        "succeeded",
        "failed",
        "canceled",
        "aborted",
    }


@pytest.mark.parametrize("status", ["queued", "SUCCEEDED", "", None])
def test_unknown_status_is_a_validation_error(status: Any) -> None:
    with pytest.raises(ValidationError) as info:
        prediction(status=status)
    assert info.value.errors()[0]["loc"] == ("status",)


def test_missing_status_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        Prediction.model_validate({"id": "abc123", "output": "https://x/y.png"})


def test_full_prediction_object() -> None:
    parsed = Prediction.model_validate(
        {
            "id": "ufawqhfynnddngldkgtslldrkq",
            "model": DEV,
            "version": "hidden",
            "input": {"prompt": "x"},
            "logs": "step 1\n",
            "output": None,
            "error": None,
            "status": "processing",
            "created_at": "2025-06-01T10:00:00.000Z",
            "started_at": "2025-06-01T10:00:01.5Z",
            "completed_at": None,
            "data_removed": False,
            "urls": {
                "get": "https://api.replicate.com/v1/predictions/ufawqhfynnddngldkgtslldrkq",
                "cancel": "https://api.replicate.com/v1/predictions/ufawqhfynnddngldkgtslldrkq/cancel",
                "web": "https://replicate.com/p/ufawqhfynnddngldkgtslldrkq",
                "stream": "https://stream.replicate.com/x",
            },
            "metrics": {"predict_time": 1.5, "total_time": 2.0, "image_count": 1},
            "deployment": None,
        }
    )
    assert parsed.created_at == datetime(2025, 6, 1, 10, 0, tzinfo=timezone.utc)
    assert parsed.web_url == "https://replicate.com/p/ufawqhfynnddngldkgtslldrkq"
    assert parsed.urls.get.endswith("/ufawqhfynnddngldkgtslldrkq")
    assert parsed.metrics.predict_time == 1.5
    # unknown fields are kept, not rejected (the API adds fields over time)
    assert parsed.metrics.model_extra == {"image_count": 1}
    assert parsed.model_extra == {"deployment": None}
    assert parsed.output_urls == []


def test_minimal_prediction_defaults() -> None:
    parsed = Prediction.model_validate({"status": "starting"})
    assert parsed.id is None
    assert parsed.urls.get is None
    assert parsed.web_url is None
    assert parsed.data_removed is False
    assert parsed.metrics.predict_time is None


@pytest.mark.parametrize(
    ("output", "urls"),
    [
        ("https://replicate.delivery/a.webp", ["https://replicate.delivery/a.webp"]),
        (
            ["https://replicate.delivery/a.png", "https://replicate.delivery/b.png"],
            ["https://replicate.delivery/a.png", "https://replicate.delivery/b.png"],
        ),
        (
            [{"url": "https://replicate.delivery/a.png"}, {"url": "https://replicate.delivery/b.png"}],
            ["https://replicate.delivery/a.png", "https://replicate.delivery/b.png"],
        ),
        ({"url": "https://replicate.delivery/a.png"}, ["https://replicate.delivery/a.png"]),
        ("data:image/webp;base64,UklGRg==", ["data:image/webp;base64,UklGRg=="]),
        (
            ["data:image/png;base64,iVBO", {"url": "data:image/png;base64,AAAA"}],
            [
                "data:image/png;base64,iVBO",
                "data:image/png;base64,AAAA",
            ],
        ),
        (None, []),
        ([], []),
        ([None, {"url": None}, {"no": "url"}, 3], []),
        (42, []),
    ],
)
def test_output_urls(output: Any, urls: list[str]) -> None:
    assert prediction(status="succeeded", output=output).output_urls == urls


def test_images_api_shape_parses_to_succeeded() -> None:
    parsed = Prediction.model_validate(
        {
            "created": 1589478378,
            "data": [{"url": "https://proxy.example/a.png"}, {"url": "https://proxy.example/b.png"}],
        }
    )
    assert parsed.status is PredictionStatus.SUCCEEDED
    assert parsed.is_terminal
    assert parsed.output_urls == ["https://proxy.example/a.png", "https://proxy.example/b.png"]
    assert parsed.id is None
    assert parsed.created_at is not None
    assert parsed.created_at.timestamp() == 1589478378
    assert parsed.completed_at == parsed.created_at
    assert parsed.created_at.tzinfo is not None


def test_images_api_shape_with_plain_strings_and_no_created() -> None:
    parsed = Prediction.model_validate({"data": ["https://proxy.example/a.png"]})
    assert parsed.status is PredictionStatus.SUCCEEDED
    assert parsed.output_urls == ["https://proxy.example/a.png"]
    assert parsed.created_at is None


def test_prediction_with_status_and_data_is_a_prediction() -> None:
    # a real prediction whose extra "data" field happens to be a list must not be reinterpreted
    parsed = prediction(status="processing", data=[{"url": "https://x/y.png"}])
    assert parsed.status is PredictionStatus.PROCESSING
    assert parsed.output_urls == []


def test_logs_tail() -> None:
    logs = "".join(f"line {i}\n" for i in range(1, 101))
    parsed = prediction(logs=logs)
    assert parsed.logs_tail() == "\n".join(f"line {i}" for i in range(81, 101))
    assert parsed.logs_tail(lines=2) == "line 99\nline 100"
    assert parsed.logs_tail(lines=2, max_chars=5) == "e 100"
    assert prediction(logs=None).logs_tail() == ""
    assert prediction(logs="").logs_tail() == ""
    assert prediction(logs="only line").logs_tail() == "only line"
    assert prediction(logs="a\nb\n\n\n").logs_tail(lines=2) == "a\nb"


# --- other response models ------------------------------------------------------------------------


def test_account_and_uploaded_file() -> None:
    account = Account.model_validate({"type": "user", "username": "alice", "name": "Alice", "extra": 1})
    assert (account.username, account.name) == ("alice", "Alice")
    with pytest.raises(ValidationError):
        Account.model_validate({"type": "user"})
    uploaded = UploadedFile.model_validate(
        {
            "id": "file-1",
            "name": "cat.png",
            "content_type": "image/png",
            "size": 3,
            "urls": {"get": "https://api.replicate.com/v1/files/file-1"},
            "expires_at": "2025-06-02T10:00:00Z",
            "checksums": {"sha256": "ab"},
        }
    )
    assert uploaded.urls.get == "https://api.replicate.com/v1/files/file-1"
    with pytest.raises(ValidationError):
        UploadedFile.model_validate({"id": "file-1", "urls": {}})


def test_images_api_b64_json_becomes_a_data_uri_with_its_sniffed_type():
    import base64

    jpeg = b"\xff\xd8\xff\xe0" + bytes(40)
    encoded = base64.b64encode(jpeg).decode()
    wrapped = "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20))  # line-wrapped base64
    prediction = Prediction.model_validate(
        {"created": 1_700_000_000, "data": [{"b64_json": wrapped, "revised_prompt": "a red mug"}]}
    )
    assert prediction.status.value == "succeeded"
    assert prediction.output_urls == [f"data:image/jpeg;base64,{encoded}"]
    assert prediction.revised_prompt == "a red mug"
    assert prediction.shape == "{created, data: [{b64_json, revised_prompt}]}"


def test_images_api_url_items_and_mixed_shapes():
    prediction = Prediction.model_validate(
        {"created": 1_700_000_000, "data": [{"url": "https://x/a.png"}, "https://x/b.png", 7]}
    )
    assert prediction.output_urls == ["https://x/a.png", "https://x/b.png"]
    assert prediction.revised_prompt is None


def test_images_api_without_a_usable_item_parses_to_no_output():
    prediction = Prediction.model_validate({"created": 1, "data": [{"image": "???"}]})
    assert prediction.output_urls == []
    assert prediction.shape == "{created, data: [{image}]}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-01-01T00:05:00Z", "2026-01-01T00:05:00+00:00"),
        ("2026-01-01T00:05:00", None),  # zone-less: cannot be placed on any clock
        ("soon", None),
        (None, None),
    ],
)
def test_prediction_deadline_is_read_leniently(value, expected):
    prediction = Prediction.model_validate({"id": "p", "status": "starting", "deadline": value})
    assert (prediction.deadline.isoformat() if prediction.deadline else None) == expected


def test_a_cancel_at_the_deadline_is_told_from_any_other_on_the_servers_times_alone() -> None:
    from airflow_provider_kontext.edits.deadlines import canceled_at_deadline

    def canceled(**times: str) -> Prediction:
        return Prediction.model_validate({"id": "p", "status": "canceled", **times})

    assert canceled_at_deadline(
        canceled(deadline="2026-12-06T10:01:00Z", completed_at="2026-12-06T10:01:00.3Z")
    )
    assert canceled_at_deadline(
        canceled(deadline="2026-12-06T10:01:00Z", completed_at="2026-12-06T10:00:59.5Z")
    )
    assert not canceled_at_deadline(
        canceled(deadline="2026-12-06T10:01:00Z", completed_at="2026-12-06T10:00:50Z")
    )
    assert not canceled_at_deadline(canceled(completed_at="2026-12-06T10:01:00Z"))  # no Cancel-After sent
    zoneless = canceled(deadline="2026-12-06T10:01:00", completed_at="2026-12-06T10:01:00Z")
    assert not canceled_at_deadline(zoneless)  # a deadline no clock can place counts as none
    naive_end = canceled(deadline="2026-12-06T10:01:00Z", completed_at="2026-12-06T10:01:00")
    assert canceled_at_deadline(naive_end)  # a zone-less completed_at is read as UTC
    aborted = Prediction.model_validate(
        {
            "id": "p",
            "status": "aborted",
            "deadline": "2026-12-06T10:01:00Z",
            "completed_at": "2026-12-06T10:01:00Z",
        }
    )
    assert not canceled_at_deadline(aborted)  # never started: redone as it is
