"""Name the models and build the inputs the model tests validate."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.models import (
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
    """Return valid dev inputs plus ``values``."""
    return {"prompt": "make it a watercolour", "input_image": IMAGE, **values}


def invalid(model: str, values: dict[str, Any]) -> FluxKontextInputError:
    with pytest.raises(FluxKontextInputError) as info:
        validate_input(model, values)
    return info.value
