"""The models' input schemas (pydantic): the single source of what an edit may ask for.

The operator validates its inputs here before any HTTP call, and the emulator answers 422 from the
same models, so a rule is written once.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticSerializationError, to_json

from airflow_provider_kontext.exceptions import FluxKontextInputError

DEFAULT_MODEL = "black-forest-labs/flux-kontext-dev"

#: Schemes accepted for an image handed to the model by reference.
IMAGE_URI_SCHEMES = ("https://", "http://", "data:")

#: Content types the model accepts for ``input_image``.
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

#: ``owner/name``, ``owner/name:version`` or a bare 64-hex version id. Nothing else may reach a URL
#: path: ``?``, ``#``, ``/``, spaces or ``..`` in a model name would change the request's target.
MODEL_REFERENCE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}(?::[A-Za-z0-9][A-Za-z0-9._-]{0,127})?"
    r"|[0-9a-f]{64}"
)

AspectRatio = Literal[
    "match_input_image", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"
]
ProAspectRatio = Literal[
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
    "2:1",
    "1:2",
]


def _check_image_uri(value: str) -> str:
    if not value[:8].lower().startswith(IMAGE_URI_SCHEMES):
        raise ValueError(
            "must be an http(s) URL or a data: URI (local files, ObjectStoragePath and bytes are "
            "uploaded by the operator first)"
        )
    if value[:5].lower() != "data:" and not urlsplit(value).hostname:
        raise ValueError("must be an http(s) URL with a host name")
    if value[:5].lower() == "data:":
        header, comma, payload = value[5:].partition(",")
        media_type = header.split(";", 1)[0].strip().lower()
        if media_type not in (*IMAGE_CONTENT_TYPES, "image/jpg"):
            raise ValueError(f"data: URI must hold one of {', '.join(IMAGE_CONTENT_TYPES)}")
        if not comma:
            raise ValueError("data: URI has no ',' before its data")
        if header.lower().endswith(";base64"):
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                raise ValueError("data: URI is marked ;base64 but its data is not valid base64") from None
    return value


class _KontextInput(BaseModel):
    """Common configuration: unknown keys are errors, whitespace-only prompts are errors."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, frozen=True)

    prompt: str = Field(min_length=1, max_length=10_000, description="The edit instruction.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class FluxKontextDevInput(_KontextInput):
    """Inputs of ``black-forest-labs/flux-kontext-dev`` with Replicate's defaults and bounds."""

    input_image: str = Field(description="The image to edit: an https URL or a data: URI.")
    aspect_ratio: AspectRatio = "match_input_image"
    num_inference_steps: int = Field(28, ge=4, le=50)
    guidance: float = Field(2.5, ge=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="0 or unset means random.")
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(80, ge=0, le=100, description="Ignored for png.")
    disable_safety_checker: bool = False
    go_fast: bool = True

    @field_validator("input_image")
    @classmethod
    def _image_uri(cls, value: str) -> str:
        return _check_image_uri(value)


class FluxKontextProInput(_KontextInput):
    """Inputs of ``flux-kontext-pro`` and ``flux-kontext-max``."""

    input_image: str | None = None
    aspect_ratio: ProAspectRatio = "match_input_image"
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    output_format: Literal["jpg", "png"] = "png"
    safety_tolerance: int = Field(2, ge=0, le=6)
    prompt_upsampling: bool = False

    @field_validator("input_image")
    @classmethod
    def _image_uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_image_uri(value)

    @model_validator(mode="after")
    def _tolerance_with_image(self) -> FluxKontextProInput:
        if self.input_image is not None and self.safety_tolerance > 2:
            raise ValueError("safety_tolerance must be at most 2 when input_image is given")
        return self


class PassThroughInput(_KontextInput):
    """Inputs of a Kontext model this provider has no schema for.

    ``prompt`` is checked, the rest is passed through as given, so a newer model version is never
    blocked by this package.
    """

    model_config = ConfigDict(extra="allow", frozen=True)


INPUT_MODELS: dict[str, type[_KontextInput]] = {
    "black-forest-labs/flux-kontext-dev": FluxKontextDevInput,
    "black-forest-labs/flux-kontext-pro": FluxKontextProInput,
    "black-forest-labs/flux-kontext-max": FluxKontextProInput,
}


def model_name(model: str) -> str:
    """``owner/name`` of a model reference that may carry a ``:version`` suffix."""
    return model.split(":", 1)[0]


def input_model_for(model: str) -> type[_KontextInput]:
    """Return the input schema of ``model`` (``owner/name`` or ``owner/name:version``)."""
    return INPUT_MODELS.get(model_name(model), PassThroughInput)


def _describe(error: Any) -> tuple[str, str]:
    loc = ".".join(str(part) for part in error["loc"]) or "input"
    kind = error["type"]
    if kind == "extra_forbidden":
        return loc, "unknown input"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if "input" in error and kind not in ("missing",):
        message += f" (got {_shown(error['input'])})"
    return loc, message


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model_reference(model: Any) -> str:
    """``model`` if it is ``owner/name``, ``owner/name:version`` or a 64-hex version id.

    :raises FluxKontextInputError: anything else (it would end up in the request's URL path).
    """
    if not isinstance(model, str) or not MODEL_REFERENCE.fullmatch(model):
        message = (
            "must be 'owner/name' or 'owner/name:version' (letters, digits, '.', '_', '-') "
            f"or a 64-hex version id (got {_shown(model)})"
        )
        raise FluxKontextInputError(f"model: {message}", errors=[("model", message)])
    return model


def _json_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the inputs that cannot be sent as JSON (bytes that are not text, arbitrary objects)."""
    problems = []
    for key, value in values.items():
        try:
            to_json(value)
        except (PydanticSerializationError, ValueError) as exc:
            problems.append((str(key), f"cannot be sent as JSON: {str(exc)[:200]} (got {_shown(value)})"))
    return problems


def validate_input(model: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validate ``values`` against ``model``'s schema and return the JSON body's ``input``.

    Only the keys the caller gave are sent (the model's own defaults apply to the rest), with
    values normalised by the schema (``"28"`` from a template becomes ``28``).

    :raises FluxKontextInputError: naming each bad field, what is allowed, and what was given (``model``
        itself when it is not a model reference).
    """
    check_model_reference(model)
    schema = input_model_for(model)
    try:
        parsed = schema.model_validate(values)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        allowed = sorted(schema.model_fields)
        lines = [f"{field}: {msg}" for field, msg in problems]
        if any(msg == "unknown input" for _, msg in problems):
            lines.append(f"allowed inputs for {model_name(model)}: {', '.join(allowed)}")
        raise FluxKontextInputError(
            f"Invalid input for {model_name(model)}: " + "; ".join(lines), errors=problems
        ) from None
    try:
        return parsed.model_dump(mode="json", exclude_unset=True)
    except (PydanticSerializationError, ValueError):
        # Inputs passed through for a model without a schema may be anything: name the bad ones.
        problems = _json_problems(parsed.model_dump(exclude_unset=True)) or [
            ("input", "cannot be sent as JSON")
        ]
        raise FluxKontextInputError(
            f"Invalid input for {model_name(model)}: " + "; ".join(f"{f}: {m}" for f, m in problems),
            errors=problems,
        ) from None


def check_literal_input(model: str, values: dict[str, Any]) -> None:
    """Check some of an edit's inputs, the others being known only later (templates, XCom).

    Each given field is checked against ``model``'s schema; missing fields and rules that tie
    several fields together are left to :func:`validate_input` at run time.

    :raises FluxKontextInputError: naming each bad field and what is allowed (``model`` itself when it
        is not a model reference).
    """
    check_model_reference(model)
    if not values:
        return
    schema = input_model_for(model)
    try:
        schema.model_validate(values)
    except ValidationError as exc:
        problems = [
            _describe(err)
            for err in exc.errors()
            if err["loc"] and err["loc"][0] in values and err["type"] != "missing"
        ]
        if problems:
            lines = [f"{field}: {msg}" for field, msg in problems]
            if any(msg == "unknown input" for _, msg in problems):
                lines.append(
                    f"allowed inputs for {model_name(model)}: {', '.join(sorted(schema.model_fields))}"
                )
            raise FluxKontextInputError(
                f"Invalid input for {model_name(model)}: " + "; ".join(lines), errors=problems
            ) from None
