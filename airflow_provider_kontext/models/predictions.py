"""Describe what the API answers (pydantic): predictions, the account and uploaded files.

The single source of the prediction's shape. The hook parses every response with these, so a
malformed answer is a clear error.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_provider_kontext.models.images import sniff_image_type


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
        """Tell whether the status is final (succeeded, failed, canceled or aborted)."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {PredictionStatus.SUCCEEDED, PredictionStatus.FAILED, PredictionStatus.CANCELED, PredictionStatus.ABORTED}
)


class PredictionUrls(BaseModel):
    """A prediction's ``urls``: the API's links to read, cancel, stream and view it."""

    model_config = ConfigDict(extra="allow")

    get: str | None = None
    cancel: str | None = None
    web: str | None = None
    stream: str | None = None


class PredictionMetrics(BaseModel):
    """A prediction's ``metrics``: how long the model ran, and in all."""

    model_config = ConfigDict(extra="allow")

    predict_time: float | None = None
    total_time: float | None = None

    @field_validator("predict_time", "total_time", mode="before")
    @classmethod
    def _finite_or_none(cls, value: Any) -> Any:
        """Drop a metric that is not a finite number rather than fail the whole prediction.

        It never becomes a NaN or infinity in an event, which a JSON column would refuse.
        """
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
    #: The images-API answer's rewritten prompt(s), if the proxy gave any (ours: not dumped).
    revised_prompt: str | None = Field(default=None, exclude=True)
    #: For an images-API answer, what it looked like (keys only, never values; not dumped).
    shape: str | None = Field(default=None, exclude=True)

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
        """Tell whether the prediction has ended."""
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
        """Return the prediction's page on the provider's website, if the API named one."""
        return self.urls.web

    def logs_tail(self, lines: int = 20, max_chars: int = 4000) -> str:
        """Return the last ``lines`` lines of the logs, at most ``max_chars`` characters."""
        if not self.logs:
            return ""
        tail = "\n".join(self.logs.rstrip("\n").splitlines()[-lines:])
        return tail[-max_chars:]


def _from_unix_time(value: Any) -> datetime | None:
    """Return a server's Unix time as an aware datetime, or ``None`` when it is not a usable one.

    A value out of the platform's range must be a validation problem, never an ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value).astimezone()
    except (OverflowError, OSError, ValueError):
        return None


def _images_api_outputs(items: list[Any]) -> tuple[list[str], list[str]]:
    """Return the outputs and revised prompts of an images-API answer's ``data`` list.

    Outputs are URLs, or base64 images as ``data:`` URIs.
    """
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
    """Return a base64 image as a ``data:`` URI, its media type sniffed from the first bytes.

    png when they say nothing: the bytes are checked again before anything is written.
    """
    compact = "".join(payload.split())
    try:
        head = base64.b64decode(compact[:32] + "=" * (-len(compact[:32]) % 4))
    except (binascii.Error, ValueError):
        head = b""
    return f"data:{sniff_image_type(head) or 'image/png'};base64,{compact}"


def _shape_of(data: dict[str, Any]) -> str:
    """Return an answer's shape by its keys (never its values), e.g. ``{created, data: [{b64_json}]}``."""
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
    """An uploaded file's ``urls``: where to read it."""

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
    #: ``{"sha256": ..., "md5": ...}`` of the content, as the Files API reports them.
    checksums: dict[str, str] = Field(default_factory=dict)


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
        """Return a validated :class:`Prediction` from one of :attr:`results`.

        :raises pydantic.ValidationError: the item is not a prediction.
        """
        return Prediction.model_validate(item)
