"""Pydantic models: the single source of the models' input schemas and of the prediction's shape.

The operator validates its inputs here before any HTTP call, the hook parses every response here,
and the emulator answers 422 from the same models, so a rule is written once.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticSerializationError, to_json

from airflow_provider_kontext.exceptions import KontextInputError
from airflow_provider_kontext.images import sniff_image_type

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
    """Inputs of a Kontext model this provider has no schema for: ``prompt`` is checked, the rest is
    passed through as given, so a newer model version is never blocked by this package."""

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
    """The input schema of ``model`` (``owner/name`` or ``owner/name:version``)."""
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

    :raises KontextInputError: anything else (it would end up in the request's URL path).
    """
    if not isinstance(model, str) or not MODEL_REFERENCE.fullmatch(model):
        message = (
            "must be 'owner/name' or 'owner/name:version' (letters, digits, '.', '_', '-') "
            f"or a 64-hex version id (got {_shown(model)})"
        )
        raise KontextInputError(f"model: {message}", errors=[("model", message)])
    return model


def _json_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """The inputs that cannot be sent as JSON (bytes that are not text, arbitrary objects)."""
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

    :raises KontextInputError: naming each bad field, what is allowed, and what was given (``model``
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
        raise KontextInputError(
            f"Invalid input for {model_name(model)}: " + "; ".join(lines), errors=problems
        ) from None
    try:
        return parsed.model_dump(mode="json", exclude_unset=True)
    except (PydanticSerializationError, ValueError):
        # Inputs passed through for a model without a schema may be anything: name the bad ones.
        problems = _json_problems(parsed.model_dump(exclude_unset=True)) or [
            ("input", "cannot be sent as JSON")
        ]
        raise KontextInputError(
            f"Invalid input for {model_name(model)}: " + "; ".join(f"{f}: {m}" for f, m in problems),
            errors=problems,
        ) from None


class PredictionStatus(str, enum.Enum):
    """Replicate's prediction statuses. ``aborted`` is terminal too (official clients forget it)."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {PredictionStatus.SUCCEEDED, PredictionStatus.FAILED, PredictionStatus.CANCELED, PredictionStatus.ABORTED}
)


class PredictionUrls(BaseModel):
    model_config = ConfigDict(extra="allow")

    get: str | None = None
    cancel: str | None = None
    web: str | None = None
    stream: str | None = None


class PredictionMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    predict_time: float | None = None
    total_time: float | None = None

    @field_validator("predict_time", "total_time", mode="before")
    @classmethod
    def _finite_or_none(cls, value: Any) -> Any:
        """A metric that is not a finite number is dropped rather than failing the whole prediction
        (and never becomes a NaN or infinity in an event, which a JSON column would refuse)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        try:
            return value if math.isfinite(value) else None
        except OverflowError:  # an int too large for a float
            return None


class Prediction(BaseModel):
    """A prediction as the API returns it.

    Also accepts the images-API shape some proxies answer with,
    ``{"created": <unix time>, "data": [{"url": ...} or {"b64_json": ...}, ...]}``: that is a finished
    (and paid) edit, so it parses to a ``succeeded`` prediction without an id whose output is those
    URLs, base64 images as ``data:`` URIs; ``revised_prompt`` is kept and ``shape`` names what the
    answer looked like (for the error when none of it is usable).
    """

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    model: str | None = None
    version: str | None = None
    status: PredictionStatus
    input: dict[str, Any] | None = None
    output: Any = None
    logs: str | None = None
    error: Any = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    #: When the server will cancel it (given with ``Cancel-After``); an unreadable value counts as none.
    deadline: datetime | None = None
    data_removed: bool = False
    urls: PredictionUrls = Field(default_factory=PredictionUrls)
    metrics: PredictionMetrics = Field(default_factory=PredictionMetrics)
    #: The images-API answer's rewritten prompt(s), if the proxy gave any.
    revised_prompt: str | None = None
    #: For an images-API answer, what it looked like (keys only, never values).
    shape: str | None = None

    @field_validator("deadline", mode="wrap")
    @classmethod
    def _lenient_deadline(cls, value: Any, handler: Any) -> datetime | None:
        try:
            parsed: datetime | None = handler(value)
        except ValueError:
            return None
        if parsed is not None and parsed.tzinfo is None:
            return None  # a zone-less time cannot be placed on any clock
        return parsed

    @model_validator(mode="before")
    @classmethod
    def _images_api_shape(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # Descriptive parts a proxy may send as null: their defaults, not a rejected prediction.
            for key in ("urls", "metrics", "data_removed"):
                if key in data and data[key] is None:
                    data = {k: v for k, v in data.items() if k != key}
        if isinstance(data, dict) and "status" not in data and isinstance(data.get("data"), list):
            when = _from_unix_time(data.get("created"))
            outputs, prompts = _images_api_outputs(data["data"])
            return {
                "id": data.get("id"),
                "status": PredictionStatus.SUCCEEDED,
                "output": outputs,
                "created_at": when,
                "completed_at": when,
                "revised_prompt": "\n".join(prompts) or None,
                "shape": _shape_of(data),
            }
        return data

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def output_urls(self) -> list[str]:
        """The output as a list of URL strings, whatever shape the model or proxy used.

        A single string, a list of strings, a list of ``{"url": ...}`` objects, ``data:`` URIs and
        ``null`` are all handled; ``null`` (still running, or deleted after retention) gives ``[]``.
        """
        return _urls_in(self.output)

    @property
    def web_url(self) -> str | None:
        return self.urls.web

    def logs_tail(self, lines: int = 20, max_chars: int = 4000) -> str:
        """The last ``lines`` lines of the logs, at most ``max_chars`` characters."""
        if not self.logs:
            return ""
        tail = "\n".join(self.logs.rstrip("\n").splitlines()[-lines:])
        return tail[-max_chars:]


def _from_unix_time(value: Any) -> datetime | None:
    """A server's Unix time as an aware datetime, or ``None`` when it is not a usable one (a value
    out of the platform's range must be a validation problem, never an ``OverflowError``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value).astimezone()
    except (OverflowError, OSError, ValueError):
        return None


def _images_api_outputs(items: list[Any]) -> tuple[list[str], list[str]]:
    """The outputs (URLs, base64 images as ``data:`` URIs) and revised prompts of an images-API
    answer's ``data`` list."""
    outputs: list[str] = []
    prompts: list[str] = []
    for item in items:
        if isinstance(item, str):
            outputs.append(item)
            continue
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("url"), str):
            outputs.append(item["url"])
        elif isinstance(item.get("b64_json"), str):
            outputs.append(_base64_data_uri(item["b64_json"]))
        if isinstance(item.get("revised_prompt"), str):
            prompts.append(item["revised_prompt"])
    return outputs, prompts


def _base64_data_uri(payload: str) -> str:
    """A base64 image as a ``data:`` URI, its media type sniffed from the first bytes (png when
    they say nothing: the bytes are checked again before anything is written)."""
    compact = "".join(payload.split())
    try:
        head = base64.b64decode(compact[:32] + "=" * (-len(compact[:32]) % 4))
    except (binascii.Error, ValueError):
        head = b""
    return f"data:{sniff_image_type(head) or 'image/png'};base64,{compact}"


def _shape_of(data: dict[str, Any]) -> str:
    """An answer's shape by its keys (never its values), e.g. ``{created, data: [{b64_json}]}``."""
    items = data.get("data") or []
    item_keys = sorted({key for item in items if isinstance(item, dict) for key in item})
    inner = "{" + ", ".join(item_keys) + "}" if item_keys else ("strings" if items else "")
    keys = ", ".join(f"data: [{inner}]" if key == "data" else key for key in sorted(data))
    return ("{" + keys + "}")[:300]


def _urls_in(output: Any) -> list[str]:
    if output is None:
        return []
    if isinstance(output, str):
        return [output]
    if isinstance(output, dict):
        url = output.get("url")
        return [url] if isinstance(url, str) else []
    if isinstance(output, list):
        return [url for item in output for url in _urls_in(item)]
    return []


class Account(BaseModel):
    """``GET /v1/account``."""

    model_config = ConfigDict(extra="allow")

    type: str | None = None
    username: str
    name: str | None = None
    github_url: str | None = None


class FileUrls(BaseModel):
    model_config = ConfigDict(extra="allow")

    get: str


class UploadedFile(BaseModel):
    """A file created with ``POST /v1/files``; ``urls.get`` is what a model input refers to."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str | None = None
    content_type: str | None = None
    size: int | None = None
    urls: FileUrls
    expires_at: datetime | None = None


class PredictionPage(BaseModel):
    """One page of ``GET /v1/predictions``: newest first, up to 100, without ``logs``.

    ``results`` stay raw JSON objects: a reader looking for a few predictions among many validates
    only those (:meth:`prediction`).
    """

    model_config = ConfigDict(extra="allow")

    results: list[dict[str, Any]] = Field(default_factory=list)
    next: str | None = None
    previous: str | None = None

    @property
    def next_cursor(self) -> str | None:
        """The cursor of the next (older) page, from the ``next`` URL; ``None`` on the last page."""
        if not self.next:
            return None
        values = parse_qs(urlsplit(self.next).query).get("cursor")
        return values[0] if values else None

    @staticmethod
    def prediction(item: dict[str, Any]) -> Prediction:
        """A validated :class:`Prediction` from one of :attr:`results`.

        :raises pydantic.ValidationError: the item is not a prediction.
        """
        return Prediction.model_validate(item)
