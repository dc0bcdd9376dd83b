"""Test the input schemas (``validate_input``): selection, bounds, enums, keys, coercion, models."""

from __future__ import annotations

from typing import get_args

import pytest

from airflow_provider_kontext.models import (
    DEFAULT_MODEL,
    AspectRatio,
    FluxKontextDevInput,
    FluxKontextProInput,
    PassThroughInput,
    ProAspectRatio,
    input_model_for,
    model_name,
    validate_input,
)

from .helpers import DEV, DEV_ASPECT_RATIOS, DEV_FIELDS, IMAGE, MAX, PRO, PRO_FIELDS, dev, invalid

# --- schema selection -----------------------------------------------------------------------------


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


# --- bounds ---------------------------------------------------------------------------------------


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


# --- enums ----------------------------------------------------------------------------------------


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


# --- coercion and exclude_unset -------------------------------------------------------------------


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


# --- pro / max ------------------------------------------------------------------------------------


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


# --- unknown models -------------------------------------------------------------------------------


def test_unknown_model_passes_everything_through() -> None:
    values = {"prompt": "x", "input_image": "s3://not/checked", "steps": "30", "nested": {"a": [1, 2]}}
    assert validate_input("someone/kontext-fork:v2", values) == values


def test_unknown_model_still_checks_the_prompt() -> None:
    err = invalid("someone/kontext-fork", {"prompt": "  ", "whatever": 1})
    assert [field for field, _ in err.errors] == ["prompt"]
    assert str(err).startswith("Invalid input for someone/kontext-fork: prompt:")
    assert invalid("someone/kontext-fork", {"whatever": 1}).errors == [("prompt", "Field required")]
