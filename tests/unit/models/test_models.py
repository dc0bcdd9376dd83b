"""Input schemas (``validate_input``) and the prediction model (``Prediction``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.models import (
    DEFAULT_MODEL,
    TERMINAL_STATUSES,
    Account,
    AspectRatio,
    FluxKontextDevInput,
    FluxKontextProInput,
    PassThroughInput,
    Prediction,
    PredictionStatus,
    ProAspectRatio,
    UploadedFile,
    input_model_for,
    model_name,
    validate_input,
)

DEV = "black-forest-labs/flux-kontext-dev"
PRO = "black-forest-labs/flux-kontext-pro"
MAX = "black-forest-labs/flux-kontext-max"
IMAGE = "https://example.com/cat.png"

DEV_ASPECT_RATIOS = [
    "match_input_image",
    "1:1",
    "16:9",
    "21:9",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "3:4",
    "4:3",
    "9:16",
    "9:21",
]
DEV_FIELDS = [
    "aspect_ratio",
    "disable_safety_checker",
    "go_fast",
    "guidance",
    "input_image",
    "num_inference_steps",
    "output_format",
    "output_quality",
    "prompt",
    "seed",
]
PRO_FIELDS = [
    "aspect_ratio",
    "input_image",
    "output_format",
    "prompt",
    "prompt_upsampling",
    "safety_tolerance",
    "seed",
]


def dev(**values: Any) -> dict[str, Any]:
    """Valid dev inputs plus ``values``."""
    return {"prompt": "make it a watercolour", "input_image": IMAGE, **values}


def invalid(model: str, values: dict[str, Any]) -> FluxKontextInputError:
    with pytest.raises(FluxKontextInputError) as info:
        validate_input(model, values)
    return info.value


# --- schema selection ----------------------------------------------------------------------------


def test_default_model_is_dev() -> None:
    assert DEFAULT_MODEL == DEV
    assert input_model_for(DEFAULT_MODEL) is FluxKontextDevInput


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (DEV, FluxKontextDevInput),
        (f"{DEV}:{'a' * 64}", FluxKontextDevInput),
        (PRO, FluxKontextProInput),
        (MAX, FluxKontextProInput),
        (f"{MAX}:abc", FluxKontextProInput),
        ("someone/kontext-fork", PassThroughInput),
    ],
)
def test_input_model_for(model: str, schema: type) -> None:
    assert input_model_for(model) is schema


def test_model_name_strips_version() -> None:
    assert model_name(f"{DEV}:1234") == DEV
    assert model_name(DEV) == DEV


def test_version_suffix_uses_the_models_schema() -> None:
    err = invalid(f"{DEV}:deadbeef", dev(aspect_ratio="2:1"))
    # the message names the model without its version
    assert f"Invalid input for {DEV}:" in str(err)
    assert "deadbeef" not in str(err)


# --- bounds ----------------------------------------------------------------------------------------


BOUNDS = [
    # field, accepted values (at and just inside each edge), rejected values (just outside)
    ("num_inference_steps", [4, 5, 49, 50], [3, 51]),
    ("guidance", [0, 0.01, 9.99, 10], [-0.01, 10.01]),
    ("output_quality", [0, 1, 99, 100], [-1, 101]),
    ("seed", [0, 1, 2**63 - 1], [-1, 2**63]),
]


@pytest.mark.parametrize(
    ("field", "value"), [(field, value) for field, ok, _ in BOUNDS for value in ok], ids=str
)
def test_dev_bound_accepted(field: str, value: float) -> None:
    assert validate_input(DEV, dev(**{field: value}))[field] == value


@pytest.mark.parametrize(
    ("field", "value"), [(field, value) for field, _, bad in BOUNDS for value in bad], ids=str
)
def test_dev_bound_rejected(field: str, value: float) -> None:
    err = invalid(DEV, dev(**{field: value}))
    assert str(err).startswith(f"Invalid input for {DEV}: {field}: ")
    assert f"(got {value!r})" in str(err)
    ((where, message),) = err.errors
    assert where == field
    assert "greater than or equal" in message or "less than or equal" in message


def test_bool_inputs() -> None:
    assert validate_input(DEV, dev(go_fast=False))["go_fast"] is False
    err = invalid(DEV, dev(go_fast="maybe"))
    assert err.errors[0][0] == "go_fast"


def test_several_problems_are_all_reported() -> None:
    err = invalid(DEV, dev(num_inference_steps=3, guidance=11, seed=-1))
    assert [field for field, _ in err.errors] == ["num_inference_steps", "guidance", "seed"]
    for field in ("num_inference_steps", "guidance", "seed"):
        assert f"{field}: " in str(err)


def test_input_error_is_a_value_error() -> None:
    # operators and test_connection catch ValueError; the hierarchy keeps that working
    assert isinstance(invalid(DEV, dev(seed=-1)), ValueError)


# --- enums -----------------------------------------------------------------------------------------


def test_dev_aspect_ratio_literal_matches_the_reference() -> None:
    assert list(get_args(AspectRatio)) == DEV_ASPECT_RATIOS
    assert list(get_args(ProAspectRatio)) == [*DEV_ASPECT_RATIOS, "2:1", "1:2"]


@pytest.mark.parametrize("ratio", DEV_ASPECT_RATIOS)
def test_dev_aspect_ratio_accepted(ratio: str) -> None:
    assert validate_input(DEV, dev(aspect_ratio=ratio))["aspect_ratio"] == ratio


@pytest.mark.parametrize("ratio", ["2:1", "1:2", "square", "", "1:1 "])
def test_dev_aspect_ratio_rejected_with_allowed_values(ratio: str) -> None:
    err = invalid(DEV, dev(aspect_ratio=ratio))
    message = str(err)
    assert "aspect_ratio: Input should be 'match_input_image', '1:1'" in message
    for allowed in DEV_ASPECT_RATIOS:
        assert f"'{allowed}'" in message
    assert f"(got {ratio!r})" in message
    assert [field for field, _ in err.errors] == ["aspect_ratio"]


@pytest.mark.parametrize("fmt", ["webp", "jpg", "png"])
def test_dev_output_format_accepted(fmt: str) -> None:
    assert validate_input(DEV, dev(output_format=fmt))["output_format"] == fmt


@pytest.mark.parametrize("fmt", ["jpeg", "gif", "PNG"])
def test_dev_output_format_rejected_with_allowed_values(fmt: str) -> None:
    message = str(invalid(DEV, dev(output_format=fmt)))
    assert "output_format: Input should be 'webp', 'jpg' or 'png'" in message
    assert f"(got {fmt!r})" in message


# --- unknown keys, prompt, image ------------------------------------------------------------------


def test_unknown_key_lists_allowed_inputs() -> None:
    err = invalid(DEV, dev(safety_tolerance=2, steps=20))
    message = str(err)
    assert "safety_tolerance: unknown input" in message
    assert "steps: unknown input" in message
    assert f"allowed inputs for {DEV}: {', '.join(DEV_FIELDS)}" in message
    assert ("steps", "unknown input") in err.errors


def test_allowed_inputs_are_listed_only_for_unknown_keys() -> None:
    assert "allowed inputs" not in str(invalid(DEV, dev(seed=-1)))


def test_unknown_key_on_pro_lists_pro_inputs() -> None:
    message = str(invalid(PRO, {"prompt": "x", "guidance": 3}))
    assert "guidance: unknown input" in message
    assert f"allowed inputs for {PRO}: {', '.join(PRO_FIELDS)}" in message


@pytest.mark.parametrize("prompt", ["", " ", "\n\t  "])
def test_blank_prompt_rejected(prompt: str) -> None:
    err = invalid(DEV, dev(prompt=prompt))
    assert [field for field, _ in err.errors] == ["prompt"]


def test_prompt_whitespace_is_kept_and_long_prompt_bounded() -> None:
    assert validate_input(DEV, dev(prompt="  keep me  "))["prompt"] == "  keep me  "
    assert validate_input(DEV, dev(prompt="x" * 10_000))["prompt"] == "x" * 10_000
    err = invalid(DEV, dev(prompt="x" * 10_001))
    assert err.errors[0][0] == "prompt"
    # a long value is shortened in the message
    assert "(got 'xxxxx" in str(err)
    assert "...)" in str(err)
    assert len(str(err)) < 400


@pytest.mark.parametrize("missing", ["prompt", "input_image"])
def test_dev_required_fields(missing: str) -> None:
    values = dev()
    del values[missing]
    err = invalid(DEV, values)
    assert err.errors == [(missing, "Field required")]


@pytest.mark.parametrize(
    "image",
    [
        "https://example.com/a.png",
        "http://localhost:8000/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_input_image_schemes_accepted(image: str) -> None:
    assert validate_input(DEV, dev(input_image=image))["input_image"] == image


@pytest.mark.parametrize(
    "image",
    ["/tmp/cat.png", "cat.png", "file:///tmp/cat.png", "s3://bucket/cat.png", "ftp://x/cat.png", ""],
)
def test_input_image_other_schemes_rejected(image: str) -> None:
    err = invalid(DEV, dev(input_image=image))
    assert err.errors[0][0] == "input_image"
    assert "must be an http(s) URL or a data: URI" in str(err)


@pytest.mark.parametrize(
    "image", ["data:text/plain;base64,aGk=", "data:image/bmp;base64,Qk0=", "data:,hello"]
)
def test_data_uri_must_hold_an_image_type_the_model_accepts(image: str) -> None:
    err = invalid(DEV, dev(input_image=image))
    assert err.errors[0][0] == "input_image"
    assert "image/jpeg, image/png, image/gif, image/webp" in str(err)


@pytest.mark.parametrize("media_type", ["image/jpeg", "image/jpg", "image/png", "image/gif", "IMAGE/WEBP"])
def test_data_uri_image_types_accepted(media_type: str) -> None:
    image = f"data:{media_type};base64,AAAA"
    assert validate_input(DEV, dev(input_image=image))["input_image"] == image


def test_input_image_must_be_a_string() -> None:
    err = invalid(DEV, dev(input_image=b"\x89PNG"))
    assert err.errors[0][0] == "input_image"


# --- coercion and exclude_unset --------------------------------------------------------------------


def test_templated_strings_are_coerced() -> None:
    out = validate_input(
        DEV,
        dev(
            num_inference_steps="28",
            guidance="2.5",
            seed="42",
            output_quality="90",
            go_fast="false",
            disable_safety_checker="true",
        ),
    )
    assert out["num_inference_steps"] == 28
    assert out["guidance"] == 2.5
    assert out["seed"] == 42
    assert out["output_quality"] == 90
    assert out["go_fast"] is False
    assert out["disable_safety_checker"] is True
    assert type(out["num_inference_steps"]) is int
    assert type(out["seed"]) is int


def test_templated_string_out_of_bounds_rejected() -> None:
    err = invalid(DEV, dev(num_inference_steps="51"))
    assert err.errors[0][0] == "num_inference_steps"


def test_non_integral_steps_rejected() -> None:
    assert invalid(DEV, dev(num_inference_steps=28.5)).errors[0][0] == "num_inference_steps"
    assert validate_input(DEV, dev(num_inference_steps=28.0))["num_inference_steps"] == 28


def test_only_given_keys_are_returned() -> None:
    assert validate_input(DEV, dev()) == {"prompt": "make it a watercolour", "input_image": IMAGE}
    assert validate_input(DEV, dev(seed=0)) == {
        "prompt": "make it a watercolour",
        "input_image": IMAGE,
        "seed": 0,
    }


def test_explicit_none_seed_is_kept() -> None:
    # seed is optional: an explicit null is sent as given (the model treats it as random)
    assert validate_input(DEV, dev(seed=None))["seed"] is None


def test_validate_input_does_not_mutate_its_argument() -> None:
    values = dev(num_inference_steps="28")
    validate_input(DEV, values)
    assert values["num_inference_steps"] == "28"


# --- pro / max -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [PRO, MAX])
def test_pro_input_image_is_optional(model: str) -> None:
    assert validate_input(model, {"prompt": "a fox"}) == {"prompt": "a fox"}


@pytest.mark.parametrize("model", [PRO, MAX])
@pytest.mark.parametrize("tolerance", [0, 1, 2])
def test_pro_safety_tolerance_with_image_up_to_2(model: str, tolerance: int) -> None:
    out = validate_input(model, {"prompt": "x", "input_image": IMAGE, "safety_tolerance": tolerance})
    assert out["safety_tolerance"] == tolerance


@pytest.mark.parametrize("model", [PRO, MAX])
@pytest.mark.parametrize("tolerance", [3, 6])
def test_pro_safety_tolerance_above_2_with_image_rejected(model: str, tolerance: int) -> None:
    err = invalid(model, {"prompt": "x", "input_image": IMAGE, "safety_tolerance": tolerance})
    assert "safety_tolerance must be at most 2 when input_image is given" in str(err)


@pytest.mark.parametrize("tolerance", [3, 5, 6])
def test_pro_safety_tolerance_above_2_without_image_accepted(tolerance: int) -> None:
    assert (
        validate_input(PRO, {"prompt": "x", "safety_tolerance": tolerance})["safety_tolerance"] == tolerance
    )


@pytest.mark.parametrize("tolerance", [-1, 7])
def test_pro_safety_tolerance_outside_0_6_rejected(tolerance: int) -> None:
    err = invalid(PRO, {"prompt": "x", "safety_tolerance": tolerance})
    assert err.errors[0][0] == "safety_tolerance"


@pytest.mark.parametrize("ratio", ["2:1", "1:2", *DEV_ASPECT_RATIOS])
def test_pro_aspect_ratios(ratio: str) -> None:
    assert validate_input(MAX, {"prompt": "x", "aspect_ratio": ratio})["aspect_ratio"] == ratio


def test_pro_output_format_has_no_webp() -> None:
    assert validate_input(PRO, {"prompt": "x", "output_format": "jpg"})["output_format"] == "jpg"
    message = str(invalid(PRO, {"prompt": "x", "output_format": "webp"}))
    assert "output_format: Input should be 'jpg' or 'png'" in message


def test_pro_input_image_scheme_checked() -> None:
    assert invalid(PRO, {"prompt": "x", "input_image": "/tmp/a.png"}).errors[0][0] == "input_image"


def test_pro_schema_defaults() -> None:
    parsed = FluxKontextProInput(prompt="x")
    assert parsed.output_format == "png"
    assert parsed.safety_tolerance == 2
    assert parsed.prompt_upsampling is False


def test_dev_schema_defaults() -> None:
    parsed = FluxKontextDevInput(prompt="x", input_image=IMAGE)
    assert (parsed.aspect_ratio, parsed.num_inference_steps, parsed.guidance) == (
        "match_input_image",
        28,
        2.5,
    )
    assert (parsed.output_format, parsed.output_quality, parsed.seed) == ("webp", 80, None)
    assert (parsed.disable_safety_checker, parsed.go_fast) == (False, True)


# --- unknown models --------------------------------------------------------------------------------


def test_unknown_model_passes_everything_through() -> None:
    values = {"prompt": "x", "input_image": "s3://not/checked", "steps": "30", "nested": {"a": [1, 2]}}
    assert validate_input("someone/kontext-fork:v2", values) == values


def test_unknown_model_still_checks_the_prompt() -> None:
    err = invalid("someone/kontext-fork", {"prompt": "  ", "whatever": 1})
    assert [field for field, _ in err.errors] == ["prompt"]
    assert str(err).startswith("Invalid input for someone/kontext-fork: prompt:")
    assert invalid("someone/kontext-fork", {"whatever": 1}).errors == [("prompt", "Field required")]


# --- Prediction ------------------------------------------------------------------------------------


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


# --- other response models -------------------------------------------------------------------------


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
